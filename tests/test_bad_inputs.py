"""A catalogue of bad inputs across the API and the files lora_fx reads and writes.

Each case asserts: a LoraFxError subclass, a message that says what and where and has "How to fix:", and that
nothing changed: the model's tensors, requires_grad flags, modules and mode; files byte-identical; no temporary
files left behind. Everything runs for real on CPU; disk errors are simulated by making os / safetensors calls
raise OSError (not a mock of torch or ONNX).

Cases marked xfail(strict=True) are bugs or gaps found here: they flip to XPASS (and fail the run) when fixed.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import Rule

from conftest import TinyBlock, TinyMLP, state_of, deadline


# ------------------------------------------------------------------------------------------------ helpers
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


def files(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones too: temporary files show up here) with its bytes."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


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


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return TinyMLP().eval(), (torch.randn(4, 8),)


@pytest.fixture
def adapted(mlp):
    model, args = mlp
    a = lora_fx.adapt(model, example_inputs=args, r=4)
    with torch.no_grad():
        for lora in a.lora_fx.values():
            lora.lora_B.normal_(0, 0.1)
    return a


@pytest.fixture
def saved(adapted, tmp_path):
    """(folder of a saved adapter, its files' bytes)."""
    folder = lora_fx.save_adapter(adapted, tmp_path / "adapter")
    return folder, files(tmp_path)


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


# ------------------------------------------------------------------------------------------------ wrong types
@pytest.mark.parametrize("model", [lambda x: x, "model.pt", 3, None])
def test_01_model_not_a_module(model):
    expect(lora_fx.InputError, lambda: lora_fx.adapt(model, example_inputs=(torch.ones(1, 8),)),
           "nn.Module", type(model).__name__, "(at model)")
    expect(lora_fx.InputError, lambda: lora_fx.plan(model, example_inputs=(torch.ones(1, 8),)), "nn.Module")


@pytest.mark.parametrize("inputs", [("abc",), ["not", "tensors"], (torch.ones(3, 5),), ({"x": 1},)])
def test_02_example_inputs_not_tensors_that_fit(mlp, inputs):
    model, _ = mlp
    before = state(model)
    expect(lora_fx.InputError, lambda: lora_fx.adapt(model, example_inputs=inputs), "do not fit", "TinyMLP.forward")
    assert_unchanged(model, before)


def test_03_example_inputs_a_scalar(mlp):
    model, _ = mlp
    before = state(model)
    expect(lora_fx.InputError, lambda: lora_fx.adapt(model, example_inputs=3), "example_inputs", "int")
    assert_unchanged(model, before)


@pytest.mark.parametrize("rules, words", [
    ("fc1", ["str"]),
    (42, ["int"]),
    ([Rule(name="fc1"), "fc2"], ["rules[1]", "str"]),
    ([], ["empty"]),
    ({"name": "fc1", "r": "8"}, ["r must be a positive integer"]),
])
def test_04_rules_of_wrong_type(mlp, rules, words):
    model, args = mlp
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=rules, example_inputs=args, r=2), *words)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs, words", [
    ({"r": 0}, ["r must be a positive integer"]), ({"r": 2.5}, ["r must be a positive integer"]),
    ({"alpha": -1.0}, ["alpha must be a positive number"]), ({"dropout": 1.0}, ["dropout must be in [0, 1)"]),
])
def test_05_bad_default_settings(mlp, kwargs, words):
    model, args = mlp
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, example_inputs=args, **kwargs), *words)
    assert_unchanged(model, before)


def test_06_malformed_rule_fields():
    expect(lora_fx.RuleError, lambda: Rule(name="fc(", r=4), "not a valid regex")
    expect(lora_fx.RuleError, lambda: Rule(op="conv2d"), "unknown op kind", "conv2d")
    expect(lora_fx.RuleError, lambda: Rule(name=3), "`name` must be a string")


def test_07_unknown_frontend(mlp):
    model, args = mlp
    before = state(model)
    expect(lora_fx.InputError, lambda: lora_fx.adapt(model, example_inputs=args, frontend="jit"), "jit", "frontend")
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------ models
def test_08_empty_model():
    model = nn.Sequential()
    expect(lora_fx.NoSitesError, lambda: lora_fx.adapt(model, example_inputs=(torch.ones(2, 4),)),
           "no linear-like site", "Sequential")
    assert list(model.modules()) == [model]


def test_09_model_without_linear_sites():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    before = state(model)
    expect(lora_fx.NoSitesError, lambda: lora_fx.adapt(model, example_inputs=(torch.ones(2, 4),)),
           "no linear-like site", "open_modules")
    assert_unchanged(model, before)


def test_10_model_that_no_front_end_traces():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    model = DataDependent()
    before = state(model)
    expect(lora_fx.TraceError, lambda: lora_fx.adapt(model, example_inputs=(torch.ones(2, 4),), r=2),
           "torch.fx symbolic tracing", "torch.export", "DataDependent")
    assert_unchanged(model, before)


def test_11_model_in_train_mode_with_a_mode_dependent_forward():
    """Not an error: the adapted model runs the forward's train branch in train mode and its eval branch in eval
    mode, as the model does (F.dropout(training=self.training) is common); the model keeps its mode."""
    torch.manual_seed(0)
    model, x = ModeDependent().train(), torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted = lora_fx.adapt(model, example_inputs=(x,), r=2, frontend="fx")
    assert model.training
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x), rtol=0, atol=0)  # the train branch ("* 2")
        adapted.eval()
        torch.testing.assert_close(adapted(x), model.fc(x), rtol=0, atol=0)  # the eval branch
    assert not any(p.requires_grad for p in model.parameters())  # adapt went through (and froze the base)


# ------------------------------------------------------------------------------------------------ rules
def test_12_rules_conflict_on_one_weight():
    torch.manual_seed(0)
    model, x = Twice(), torch.randn(2, 8)
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=[Rule(name="fc", op="linear_module", r=2),
                                                                   Rule(name="fc", op="functional_linear", r=4)],
                                                    example_inputs=(x,)),
           "fc.weight", "2 sites", "r=2", "r=4")
    assert_unchanged(model, before)


def test_13_rule_matches_nothing_under_strict(mlp):
    model, args = mlp
    rules = [Rule(name="fc1", r=2), Rule(name="fc3", r=2)]
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=rules, example_inputs=args, strict=True),
           "rules[1]", "fc3")
    assert_unchanged(model, before)


def test_14_no_rule_matches_any_site(mlp):
    model, args = mlp
    before = state(model)
    expect(lora_fx.NoSitesError, lambda: lora_fx.adapt(model, rules=[Rule(name="query")], example_inputs=args),
           "no rule matched", "'fc1'", "'fc2'", "query")
    assert_unchanged(model, before)


def test_15_rank_too_large_under_strict(mlp):
    """A rule whose r exceeds a selected layer's min(in, out) is capped with a warning; strict=True refuses it."""
    model, args = mlp
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=[Rule(name="fc2", r=5)], example_inputs=args,
                                                    strict=True),
           "r=5", "min(in, out)", "fc2 (r=4)", "lower r")
    assert_unchanged(model, before)


def test_16_rule_selects_a_tied_weight():
    model = Tied()
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=[Rule(name="head", r=2)],
                                                    example_inputs=(torch.tensor([[1, 2, 3]]),)),
           "tied", "head.weight", "untie=True")
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------ adapters in memory
def test_17_fold_twice(adapted):
    folded = lora_fx.fold(adapted)
    before = state(folded)
    expect(lora_fx.NotAdaptedError, lambda: lora_fx.fold(folded), "not adapted", "TinyMLP")
    assert_unchanged(folded, before)


def test_18_fold_not_a_module():
    expect(lora_fx.InputError, lambda: lora_fx.fold("model.pt"), "str", "lora_fx.adapt")


def test_19_unmerge_without_merge(adapted, mlp):
    model, _ = mlp
    before, before_model = state(adapted), state(model)
    expect(lora_fx.FoldError, lambda: lora_fx.unmerge_adapter(adapted), "no adapter is merged", "merge_adapter")
    assert_unchanged(adapted, before)
    assert_unchanged(model, before_model)


def test_20_merge_twice_and_fold_while_merged(adapted):
    lora_fx.merge_adapter(adapted)
    before = state(adapted)
    expect(lora_fx.FoldError, lambda: lora_fx.merge_adapter(adapted), "merged already", "unmerge_adapter")
    expect(lora_fx.FoldError, lambda: lora_fx.fold(adapted), "merged in place", "unmerge_adapter")
    assert_unchanged(adapted, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("call", ["fold", "fold_inplace", "merge"])
def test_21_non_finite_lora_weights(adapted, mlp, value, call):
    model, _ = mlp
    with torch.no_grad():
        adapted.lora_fx["fc2"].lora_B[0, 0] = value  # the last LoRA: earlier ones would fold fine
    before, before_model = state(adapted), state(model)
    fn = {"fold": lambda: lora_fx.fold(adapted), "fold_inplace": lambda: lora_fx.fold(adapted, inplace=True),
          "merge": lambda: lora_fx.merge_adapter(adapted)}[call]
    expect(lora_fx.FoldError, fn, "NaN or Inf", "fc2", "nothing was folded")
    assert_unchanged(adapted, before)
    assert_unchanged(model, before_model)


def test_22_set_adapter_unknown_name(adapted):
    active = lora_fx.active_adapters(adapted)
    expect(lora_fx.InputError, lambda: lora_fx.set_adapter(adapted, "nope"), "nope", "default")
    assert lora_fx.active_adapters(adapted) == active


@pytest.mark.parametrize("name", ["default", "second", "a.b"])
def test_23_add_adapter_with_a_taken_or_bad_name(adapted, name):
    lora_fx.add_adapter(adapted, "second", r=2)
    before = state(adapted)
    expect(lora_fx.RuleError, lambda: lora_fx.add_adapter(adapted, name, r=2), repr(name), "taken")
    assert_unchanged(adapted, before)


def test_24_add_adapter_name_not_a_string(adapted):
    before = state(adapted)
    expect(lora_fx.RuleError, lambda: lora_fx.add_adapter(adapted, 3, r=2), "adapter name")
    assert_unchanged(adapted, before)


def test_25_unknown_adapter_to_fold_or_merge(adapted):
    before = state(adapted)
    expect(lora_fx.InputError, lambda: lora_fx.fold(adapted, adapters="zz"), "zz")
    expect(lora_fx.FoldError, lambda: lora_fx.merge_adapter(adapted, "zz"), "zz")
    assert_unchanged(adapted, before)


def test_26_lora_calls_on_a_plain_model(mlp):
    model, _ = mlp
    before = state(model)
    expect(lora_fx.NotAdaptedError, lambda: list(lora_fx.lora_parameters(model)), "not adapted", "TinyMLP")
    expect(lora_fx.NotAdaptedError, lambda: lora_fx.lora_state_dict(model), "not adapted")
    expect(lora_fx.NotAdaptedError, lambda: lora_fx.fold(model), "not adapted")
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------ adapter files
def test_27_load_into_a_plain_model(mlp, saved):
    model, _ = mlp
    before = state(model)
    expect(lora_fx.NotAdaptedError, lambda: lora_fx.load_adapter(model, saved[0]), "not adapted",
           "adapt_from_adapter")
    assert_unchanged(model, before)


def test_28_adapter_for_another_model(saved, tmp_path):
    torch.manual_seed(1)
    other = lora_fx.adapt(TinyMLP(8, 12, 4), example_inputs=(torch.randn(2, 8),), r=4)
    before = state(other)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(other, saved[0]), "does not fit",
           "nothing was loaded", "fc1.weight.lora_B", str(saved[0]))
    assert_unchanged(other, before)
    assert files(tmp_path) == saved[1]


def test_29_adapt_from_adapter_of_another_model(saved, tmp_path):
    torch.manual_seed(0)
    model, x = TinyBlock(), torch.randn(2, 3, 16)
    before = state(model)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.adapt_from_adapter(model, saved[0], example_inputs=(x,)),
           str(saved[0]))
    assert_unchanged(model, before)
    assert files(tmp_path) == saved[1]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_30_truncated_or_corrupt_weights_file(adapted, saved, tmp_path, damage):
    path = saved[0] / "adapter.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]),
           "adapter.safetensors", "truncated or corrupt")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


@pytest.mark.parametrize("text, words", [
    ("{not json", ["not valid JSON", "line 1"]),
    ("[1, 2]", ["JSON list, not an object"]),
    (b"\xff\xfe\x00", ["not UTF-8"]),
    ('{"format": "something else"}', ["not a lora_fx adapter config"]),
    ('{"format": "lora_fx.adapter", "format_version": 99}', ["format version 99"]),
])
def test_31_corrupt_config_file(adapted, saved, tmp_path, text, words):
    path = saved[0] / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "adapter_config.json", *words)
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


def _rewrite(folder: Path, change) -> None:
    tensors = safetensors.torch.load_file(str(folder / "adapter.safetensors"))
    safetensors.torch.save_file(change(tensors), str(folder / "adapter.safetensors"))


def test_32_adapter_file_with_wrong_dtype(adapted, saved, tmp_path):
    _rewrite(saved[0], lambda t: {k: (v * 100).to(torch.int32) for k, v in t.items()})
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "dtype int32", "float32")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


def test_33_adapter_file_with_wrong_shape(adapted, saved, tmp_path):
    _rewrite(saved[0], lambda t: {k: (torch.zeros(v.shape[0] + 1, v.shape[1]) if k == "fc1.weight.lora_A" else v)
                                  for k, v in t.items()})
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "fc1.weight.lora_A",
           "(5, 8)", "(4, 8)")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


def test_34_adapter_file_with_nan(adapted, saved, tmp_path):
    _rewrite(saved[0], lambda t: {k: (torch.full_like(v, float("nan")) if k == "fc2.weight.lora_B" else v)
                                  for k, v in t.items()})
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "fc2.weight.lora_B",
           "NaN or Inf", "nothing was loaded")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


def test_35_save_adapter_with_nan(adapted, saved, tmp_path):
    with torch.no_grad():
        adapted.lora_fx["fc2"].lora_B[0, 0] = float("nan")
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, saved[0]), "NaN or Inf", "fc2")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


def test_36_adapter_folder_or_file_missing(adapted, saved, tmp_path):
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, tmp_path / "nope"),
           "does not exist", "nope")
    (saved[0] / "adapter.safetensors").unlink()
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "adapter.safetensors",
           "missing")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


def test_37_load_while_merged(adapted, saved, tmp_path):
    lora_fx.merge_adapter(adapted)
    before = state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "merged", "unmerge_adapter")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == saved[1]


def test_38_save_where_the_parent_is_a_regular_file(adapted, tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    on_disk = files(tmp_path)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, tmp_path / "blocker" / "adapter"),
           "blocker")
    assert files(tmp_path) == on_disk


def test_39_save_into_a_folder_with_other_files(adapted, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    on_disk = files(tmp_path)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, tmp_path / "mine"), "notes.txt",
           "own folder")
    assert files(tmp_path) == on_disk


def test_40_save_where_the_target_is_a_file(adapted, tmp_path):
    (tmp_path / "adapter").write_text("x")
    on_disk = files(tmp_path)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, tmp_path / "adapter"), "not a folder")
    assert files(tmp_path) == on_disk


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["safetensors", "rename", "exchange"])
def test_41_disk_error_during_save(adapted, saved, tmp_path, monkeypatch, where):
    """A save over an existing adapter fails midway: the old adapter stays byte for byte, no temp folder is left."""
    import lora_fx.atomic as af

    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_A.add_(1.0)  # the new save would differ from the old files
    if where == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", _disk_full)
    elif where == "rename":
        monkeypatch.setattr(af, "_exchange", lambda a, b: False)  # the non-Linux path: rename aside, rename in
        monkeypatch.setattr(os, "rename", _disk_full)
    else:
        monkeypatch.setattr(af, "_exchange", _disk_full)
    before = state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, saved[0]), "saving failed",
           "No space left", str(saved[0]))
    monkeypatch.undo()
    assert files(tmp_path) == saved[1]
    assert_unchanged(adapted, before)


# ------------------------------------------------------------------------------------------------ ONNX files
@pytest.mark.parametrize("content", [b"not onnx at all \x00\x01", b"", b"\x08\x07" * 3])
def test_42_verify_a_file_that_is_not_onnx(tmp_path, content):
    (tmp_path / "bad.onnx").write_bytes(content)
    on_disk = files(tmp_path)
    expect(lora_fx.VerifyError, lambda: lora_fx.verify_onnx(tmp_path / "bad.onnx", tmp_path / "bad.onnx"),
           "not a valid ONNX model", "bad.onnx")
    assert files(tmp_path) == on_disk


def test_43_verify_a_missing_file(tmp_path):
    expect(lora_fx.VerifyError, lambda: lora_fx.verify_onnx(tmp_path / "base.onnx", tmp_path / "merged.onnx"),
           "does not exist", "base.onnx")
    assert files(tmp_path) == {}


def test_44_parity_on_a_file_that_is_not_onnx(mlp, tmp_path):
    model, args = mlp
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    expect(lora_fx.LoraFxError, lambda: lora_fx.check_parity(tmp_path / "bad.onnx", model, args, device="cpu"),
           "bad.onnx")


def test_45_parity_on_a_missing_file(mlp, tmp_path):
    model, args = mlp
    expect(lora_fx.InputError, lambda: lora_fx.check_parity(tmp_path / "no.onnx", model, args, device="cpu"),
           "does not exist", "no.onnx")


@pytest.mark.parametrize("inputs", [(torch.randn(3, 5),), (torch.randn(4, 8), torch.randn(4, 8)), ("abc",)])
def test_46_export_with_inputs_of_the_wrong_shape(mlp, tmp_path, inputs):
    model, _ = mlp
    before = state(model)
    expect(lora_fx.InputError, lambda: lora_fx.export_onnx(model, tmp_path / "m.onnx", inputs), "do not fit",
           "TinyMLP.forward")
    assert_unchanged(model, before)
    assert files(tmp_path) == {}


def test_47_export_not_a_module(tmp_path):
    expect(lora_fx.InputError, lambda: lora_fx.export_onnx("m", tmp_path / "m.onnx", (torch.ones(1, 8),)), "str")
    assert files(tmp_path) == {}


def test_48_export_where_the_parent_is_a_regular_file(mlp, tmp_path):
    model, args = mlp
    (tmp_path / "blocker").write_text("x")
    on_disk = files(tmp_path)
    expect(lora_fx.ExportError, lambda: lora_fx.export_onnx(model, tmp_path / "blocker" / "m.onnx", args),
           "not a directory", "blocker")
    assert files(tmp_path) == on_disk


def test_49_export_to_a_directory_path(mlp, tmp_path):
    model, args = mlp
    (tmp_path / "out").mkdir()
    on_disk = files(tmp_path)
    expect(lora_fx.ExportError, lambda: lora_fx.export_onnx(model, tmp_path / "out", args), "is a directory")
    assert files(tmp_path) == on_disk


def test_50_disk_error_while_moving_the_export_into_place(mlp, tmp_path, monkeypatch):
    model, args = mlp
    (tmp_path / "m.onnx").write_bytes(b"previous export")
    on_disk, before = files(tmp_path), state(model)
    monkeypatch.setattr(os, "replace", _disk_full)
    try:
        expect(lora_fx.ExportError, lambda: lora_fx.export_onnx(model, tmp_path / "m.onnx", args),
               "No space left", "m.onnx")
    finally:
        monkeypatch.undo()
        assert files(tmp_path) == on_disk  # the previous file kept, no temp folder left
        assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------ untrusted files
# Rules files, adapter folders and ONNX files come from other people: bounded time and memory, honest saves.
# overlapping alternatives under a star: re and the regex package both backtrack exponentially on long names
SLOW = r"(?:[a-z_.0-9]|[a-z_.0-9])*[A-Z]"


class LongNames(nn.Module):
    """Module names long enough (40 characters) for a backtracking regex to run for years."""

    def __init__(self):
        super().__init__()
        self.projection_of_the_input_to_hidden_units = nn.Linear(8, 8)

    def forward(self, x):
        return self.projection_of_the_input_to_hidden_units(x)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_51_a_rules_file_regex_that_backtracks_is_refused_in_bounded_time(tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    path.write_text(f"[[rule]]\nname = {json.dumps(SLOW)}\n" if suffix == ".toml" else
                    json.dumps({"rules": [{"name": SLOW}]}))
    from lora_fx.rules_file import load_rules

    rules, _ = load_rules(path)  # a valid regex: what it costs shows only when it meets long names
    model = LongNames()
    before = state(model)
    with deadline(30):
        expect(lora_fx.RuleError, lambda: lora_fx.plan(model, rules, example_inputs=(torch.randn(2, 8),)),
               "`name`", "backtracks", str(path), "rule 0")
    assert_unchanged(model, before)


def test_52_the_issue_regex_finishes_in_bounded_time():
    """(.|.)*Z doubles re's time per character: on these 40-character names `re` would run for days."""
    model, x = LongNames(), torch.randn(2, 8)
    with deadline(30):
        expect(lora_fx.NoSitesError, lambda: lora_fx.adapt(model, [Rule(name="(.|.)*Z")], example_inputs=(x,)),
               "no rule matched")


@pytest.mark.parametrize("name", ["(?i)q", "(", "a)|(b"])
def test_53_a_rule_name_that_is_no_regex_as_matched_is_refused_when_made(name):
    """(?i) inside the group the name is matched in is an re.error at match time: refused when the Rule is made."""
    expect(lora_fx.RuleError, lambda: Rule(name=name), "`name` is not a valid regex")


def test_54_a_huge_layer_span_stays_a_range(tmp_path):
    import tracemalloc

    from lora_fx.rules_file import dump_rules, load_rules

    path = tmp_path / "r.toml"
    # a million layers first: expanding it would take ~60 MB, and fails here instead of exhausting the memory below
    for span in ("0:1000000", "0:10000000000"):
        path.write_text(f'[[rule]]\nlayers = "{span}"\n')  # 36 bytes for the second
        tracemalloc.start()
        try:
            (rule,), _ = load_rules(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000, f"loading layers = {span!r} took {peak} bytes"
    assert rule.describe() == "Rule(layers='0:10000000000')" and rule.to_dict() == {"layers": "0:10000000000"}
    assert hash(rule) == hash(Rule(layers=range(0, 10_000_000_000)))
    # the span selects by membership: a site in layer 3 is in, one outside any layer (None) is not
    from lora_fx.rules import _in_layers

    assert _in_layers(3, rule.layers) and _in_layers(9_999_999_999, rule.layers)
    assert not _in_layers(10_000_000_000, rule.layers) and not _in_layers(None, rule.layers)
    again, _ = load_rules(dump_rules([rule, Rule(layers=[7, "2:4", 0])], tmp_path / "again.json"))
    assert again == [rule, Rule(layers=[0, range(2, 4), 7])]


def test_55_a_huge_layer_span_selects_layers_in_a_real_plan():
    from tests.test_rules import SelNet  # three layers

    plan = lora_fx.plan(SelNet(), [Rule(layers="1:1000000", r=2)], example_inputs=(torch.randn(2, 5, 16),),
                        frontend="fx")
    layers = {d.site.layer for d in plan.adapted}
    assert layers == {1, 2}, layers


@pytest.mark.parametrize("suffix, text", [
    (".json", '{"rules": [{"name": ' + "[" * 100_000 + "]" * 100_000 + "}]}"),
    (".toml", "x = " + "[" * 5_000 + "]" * 5_000 + "\n"),
])
def test_56_a_deeply_nested_rules_file(tmp_path, suffix, text):
    from lora_fx.rules_file import load_rules

    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    expect(lora_fx.RuleError, lambda: load_rules(path), "too deeply", str(path))


def test_57_a_deeply_nested_adapter_config(adapted, saved, tmp_path):
    (saved[0] / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "too deeply",
           "adapter_config.json")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


@pytest.fixture
def fp16_overflowing():
    """A float16 TinyMLP whose fc2 LoRA pushes one weight past float16's 65504 (fc1's LoRA folds fine, and comes
    first: an in-place fold that wrote as it went would have changed fc1 before finding fc2)."""
    torch.manual_seed(0)
    model = TinyMLP().half().eval()
    adapted = lora_fx.adapt(model, example_inputs=(torch.randn(4, 8).half(),), r=4, alpha=8)
    with torch.no_grad():
        model.fc2.weight[0, 0] = 60000.0
        adapted.lora_fx["fc1"].lora_B.normal_(0, 0.1)
        adapted.lora_fx["fc2"].lora_A.fill_(1.0)
        adapted.lora_fx["fc2"].lora_B[0, :] = 1000.0  # delta[0, :] = (8/4) · 4 · 1000 = 8000: 68000 > 65504
    return model, adapted


@pytest.mark.parametrize("call", ["fold", "fold_inplace", "merge"])
def test_58_fold_refuses_a_weight_that_overflows_its_dtype(fp16_overflowing, call):
    model, adapted = fp16_overflowing
    before, before_model = state(adapted), state(model)
    fn = {"fold": lambda: lora_fx.fold(adapted), "fold_inplace": lambda: lora_fx.fold(adapted, inplace=True),
          "merge": lambda: lora_fx.merge_adapter(adapted)}[call]
    expect(lora_fx.FoldError, fn, "fc2.weight", "float16", "NaN or Inf", "nothing was folded")
    assert_unchanged(adapted, before)
    assert_unchanged(model, before_model)
    assert state_of(adapted).merged == []


def test_59_fold_of_a_weight_near_the_limit_that_fits_still_works(fp16_overflowing):
    model, adapted = fp16_overflowing
    with torch.no_grad():
        adapted.lora_fx["fc2"].lora_B[0, :] = 500.0  # 60000 + 4000 = 64000 < 65504
    merged = lora_fx.fold(adapted)
    assert torch.isfinite(merged.get_parameter("fc2.weight")).all()
    assert float(merged.get_parameter("fc2.weight")[0, 0]) == 64000.0


def _bump(adapted) -> None:
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_A.add_(1.0)  # a new save differs from the files on disk


def test_60_save_into_a_symlinked_folder_writes_where_the_link_points(adapted, saved, tmp_path):
    """The link is followed (documented in save_adapter): the folder it points to gets the new adapter, the link
    stays a link, and no temporary folder is left beside either."""
    link = tmp_path / "latest"
    link.symlink_to(saved[0], target_is_directory=True)
    _bump(adapted)
    assert lora_fx.save_adapter(adapted, link) == link
    assert link.is_symlink() and os.readlink(link) == str(saved[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "latest"]
    assert sorted(p.name for p in saved[0].iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    on_disk = safetensors.torch.load_file(str(saved[0] / "adapter.safetensors"))
    assert torch.equal(on_disk["fc1.weight.lora_A"], adapted.lora_fx["fc1"].lora_A.detach())


def test_61_save_into_a_link_to_nothing(adapted, tmp_path):
    (tmp_path / "latest").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    on_disk = files(tmp_path)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, tmp_path / "latest"), "symbolic link",
           "does not exist", "latest")
    assert files(tmp_path) == on_disk and (tmp_path / "latest").is_symlink()


def test_62_a_save_whose_old_copy_cannot_be_removed_has_succeeded(adapted, saved, tmp_path, monkeypatch):
    """After the swap the new adapter is in place: a failure to delete the old copy is a warning that names it,
    never an error claiming that nothing changed."""
    import shutil

    import lora_fx.atomic as af

    real_rmtree = shutil.rmtree

    def stuck(path, ignore_errors=False, **kwargs):
        if ignore_errors:
            return real_rmtree(path, ignore_errors=True, **kwargs)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    _bump(adapted)
    monkeypatch.setattr(af.shutil, "rmtree", stuck)
    with pytest.warns(UserWarning, match="could not be removed") as warned:
        lora_fx.save_adapter(adapted, saved[0])
    monkeypatch.undo()
    on_disk = safetensors.torch.load_file(str(saved[0] / "adapter.safetensors"))
    assert torch.equal(on_disk["fc1.weight.lora_A"], adapted.lora_fx["fc1"].lora_A.detach())
    leftover = [p for p in tmp_path.iterdir() if p.name != "adapter"]
    assert len(leftover) == 1 and str(leftover[0]) in str(warned[0].message)


_UNPRIVILEGED_SAVE = r"""
import json, os, shutil, sys, tempfile
import torch
from torch import nn
import lora_fx

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

torch.manual_seed(0)
adapted = lora_fx.adapt(MLP().eval(), example_inputs=(torch.randn(2, 8),), r=2)
warm = tempfile.mkdtemp()
lora_fx.save_adapter(adapted, os.path.join(warm, "adapter"))  # loads what a save imports while still root (the
shutil.rmtree(warm)                                           # interpreter may live where nobody can read)
root = tempfile.mkdtemp()
if os.geteuid() == 0:  # permissions bind only an unprivileged user
    os.chown(root, 65534, 65534)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)

def snapshot():
    out = {}
    for folder, dirs, names in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = "<dir>"
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                out[os.path.relpath(os.path.join(folder, n), root)] = f.read().hex()
    return out

results = {}
for case in ("read-only parent", "read-only folder"):
    parent = os.path.join(root, case.replace(" ", "_"))
    target = os.path.join(parent, "adapter")
    os.mkdir(parent)
    lora_fx.save_adapter(adapted, target)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_A.add_(1.0)
    locked = parent if case == "read-only parent" else target
    os.chmod(locked, 0o555)
    before = snapshot()
    try:
        lora_fx.save_adapter(adapted, target)
        results[case] = "saved"
    except lora_fx.AdapterFileError as e:
        results[case] = str(e)
    results[case + ": unchanged"] = snapshot() == before
    os.chmod(locked, 0o755)
shutil.rmtree(root)
print(json.dumps(results))
"""


def test_63_a_read_only_parent_or_folder_fails_before_anything_changes():
    """Real permissions, so as an unprivileged user (root ignores them): a subprocess that drops root to `nobody`
    once it has loaded what it needs."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TMPDIR": "/tmp"}
    done = subprocess.run([sys.executable, "-c", _UNPRIVILEGED_SAVE], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for case in ("read-only parent", "read-only folder"):
        assert "not writable" in results[case] and "nothing was changed" in results[case], results
        assert "How to fix:" in results[case]
        assert results[case + ": unchanged"], results


def test_64_a_failed_save_removes_the_parent_folders_it_created(adapted, tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, tmp_path / "runs" / "7" / "adapter"),
           "saving failed", "No space left")
    monkeypatch.undo()
    assert files(tmp_path) == {}
