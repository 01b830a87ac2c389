"""Every argument of a ``forward`` call by name, for the hooks that rewrite calls.

A forward pre-hook registered ``with_kwargs=True`` gets ``(args, kwargs)`` as the caller wrote
them: a mask or label passed by position is in ``args``, and whatever a ``**kwargs`` parameter
would collect is loose in ``kwargs``. :class:`CallArguments` binds them against the signature and
returns one flat dict, which the hook can edit and hand back as ``((), named)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


class CallArguments:
    """Binds a call of ``forward`` (the signature read once) to ``{name: value}``."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.signature = inspect.signature(forward)
        params = self.signature.parameters.items()
        self.var_keyword = next((name for name, p in params if p.kind is p.VAR_KEYWORD), None)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        named = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        if self.var_keyword is not None:  # a **kwargs parameter arrives as one dict
            named.update(named.pop(self.var_keyword, None) or {})
        return named
