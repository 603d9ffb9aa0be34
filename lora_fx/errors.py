"""Errors lora_fx raises on bad input.

Every message says three things: what was wrong, where (a node, module, rule or file), and how to fix it.
Callers catch `LoraFxError`; the subclasses let tests and tools tell the stages apart.
"""

from __future__ import annotations


class LoraFxError(Exception):
    """Base of every error lora_fx raises on purpose."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what if where is None else f"{what} (at {where})"]
        if fix:
            parts.append(f"How to fix: {fix}")
        super().__init__("\n".join(parts))


class InputError(LoraFxError):
    """The model, example inputs or an argument are not what the call needs."""


class NotAdaptedError(InputError):
    """A call that needs a model lora_fx adapted (or an adapter it has) got something else."""


class TraceError(LoraFxError):
    """No front end could turn the model into an FX graph."""


class RuleError(LoraFxError):
    """A rule is malformed, conflicts with another, or matches nothing it should."""


class NoSitesError(RuleError):
    """No linear-like site was selected for LoRA."""


class FoldError(LoraFxError):
    """The adapted module cannot be folded (not adapted, non-finite LoRA weights, ...)."""


class ExportError(LoraFxError):
    """ONNX export failed or the output file cannot be written."""


class VerifyError(LoraFxError):
    """An ONNX file to verify is missing or is not a valid ONNX model."""


class AdapterFileError(LoraFxError):
    """An adapter file is missing, corrupt, or does not fit the adapted model."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn pointing at the user's line: the first caller outside lora_fx, however deep the call."""
    import os
    import sys
    import warnings

    import lora_fx.passes

    ours = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, lora_fx.passes.__file__))
    level, frame = 2, sys._getframe(1)  # level 1 is this function
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(ours):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
