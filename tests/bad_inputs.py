"""What every bad-input test checks, and the small models and fixtures they share.

Each case asserts: a LoraFxError subclass, a message that says what and where and has "How to fix:", and that
nothing changed: the model's tensors, requires_grad flags, modules and mode; files byte-identical; no temporary
files left behind. Everything runs for real on CPU; disk errors are simulated by making os / safetensors calls
raise OSError (not a mock of torch or ONNX). The cases are grouped by stage, one file each: tests/test_bad_*.py.
"""

from __future__ import annotations

import errno

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx

from conftest import files  # noqa: F401 (re-exported for the tests)


def state(module: nn.Module):
    return ({k: v.detach().clone() for k, v in module.state_dict().items()},
            {n: p.requires_grad for n, p in module.named_parameters()},
            {n: (type(m), id(m)) for n, m in module.named_modules()},
            [m.training for m in module.modules()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (a NaN planted by a test must count as unchanged)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0)) \
        and torch.equal(a.isnan(), b.isnan())


def assert_unchanged(module, before):
    tensors, flags, modules, training = state(module)
    assert tensors.keys() == before[0].keys()
    assert all(_same(before[0][k], tensors[k]) for k in tensors), "a tensor changed"
    assert flags == before[1], "requires_grad flags changed"
    assert modules == before[2], "modules changed"
    assert training == before[3], "train/eval mode changed"


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def expect(cls, fn, *words):
    with pytest.raises(lora_fx.LoraFxError) as info:
        fn()
    err, message = info.value, str(info.value)
    assert isinstance(err, cls), f"{type(err).__name__} is not {cls.__name__}: {message}"
    assert "How to fix:" in message, message
    assert err.what and err.fix, message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


class Twice(nn.Module):
    """One weight at two sites: nn.Linear, then F.linear on the same weight."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(self.fc(x), self.fc.weight)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


class ModeDependent(nn.Module):
    """Its forward branches on self.training: a trace bakes in one branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) * 2 if self.training else self.fc(x)


