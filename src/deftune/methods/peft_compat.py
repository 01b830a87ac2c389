"""The peft releases deftune's mends of peft were written against, and a shared type variable.

Three of deftune's workarounds for peft 0.21 (the release checked) are gated on its version:
:mod:`~deftune.methods.prompt_generate` (``generate()`` on transformers >= 5.24),
:mod:`~deftune.methods.virtual_positions` (per-token targets under prompt / P-tuning) and
:mod:`~deftune.methods.qa_inputs` (extractive-QA inputs dropped). Each is installed for
peft releases before 0.22 only (pre-releases of 0.22 count as 0.22); its tests compare outputs
with a reference on whichever peft is installed, so a later release that still needs a mend, or
that fixes the behaviour differently, fails them. (Workarounds that hold for any peft, such as
:mod:`~deftune.methods.prefix_cache`, are not gated.)
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

ModelT = TypeVar("ModelT", bound=nn.Module)
MENDED_BELOW = (0, 22)


def peft_needs_mends() -> bool:
    """Whether the installed peft is older than :data:`MENDED_BELOW` (the behaviours checked)."""
    import peft
    from packaging.version import Version

    return Version(peft.__version__).release < MENDED_BELOW  # 0.22.0.dev0 / rc1: (0, 22, 0)
