"""Leave the user's model as it was when a lora_fx call fails.

adapt freezes the base by setting requires_grad=False on the model's own parameters (the adapted graph shares
them), and loaders check a file only after adapting. Every entry point that touches a user's model runs inside
`unchanged_on_error`, so a refused call restores what it changed: requires_grad of every parameter and the
training flag of every module.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def unchanged_on_error(*modules: object) -> Iterator[None]:
    """Snapshot the parameters' requires_grad and the modules' training flags; restore them if the block raises."""
    roots = [m for m in modules if isinstance(m, nn.Module)]
    grads = [(p, p.requires_grad) for m in roots for p in m.parameters()]
    modes = [(sub, sub.training) for m in roots for sub in m.modules()]
    try:
        yield
    except BaseException:
        for p, flag in grads:
            p.requires_grad_(flag)
        for sub, flag in modes:
            sub.training = flag
        raise
