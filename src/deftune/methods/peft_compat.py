"""The peft releases deftune's mends of peft were written against, and a shared type variable.

deftune works around three behaviours of peft 0.21 (the release checked):
:mod:`~deftune.methods.prompt_generate` (``generate()`` on transformers >= 5.24),
:mod:`~deftune.methods.virtual_positions` (per-token targets under prompt / P-tuning) and
:mod:`~deftune.methods.qa_inputs` (extractive-QA inputs dropped). Each is installed for
peft < 0.22 only; its tests compare outputs with a reference on whichever peft is installed, so a
later release that still needs a mend, or that fixes the behaviour differently, fails them.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

ModelT = TypeVar("ModelT", bound=nn.Module)
MENDED_BELOW = "0.22"


def peft_needs_mends() -> bool:
    """Whether the installed peft is older than :data:`MENDED_BELOW` (the behaviours checked)."""
    import peft
    from packaging.version import Version

    return Version(peft.__version__) < Version(MENDED_BELOW)
