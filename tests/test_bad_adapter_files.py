"""Bad inputs, adapter files: adapter files that are missing, corrupt, for another model, or cannot be written.

What each case checks: tests/bad_inputs.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

import lora_fx

from bad_inputs import disk_full, state, assert_unchanged, files, expect
from conftest import TinyBlock, TinyMLP


def test_load_into_a_plain_model(eval_mlp, saved):
    model, _ = eval_mlp
    before = state(model)
    expect(lora_fx.NotAdaptedError, lambda: lora_fx.load_adapter(model, saved[0]), "not adapted",
           "adapt_from_adapter")
    assert_unchanged(model, before)


def test_adapter_for_another_model(saved, tmp_path):
    torch.manual_seed(1)
    other = lora_fx.adapt(TinyMLP(8, 12, 4), example_inputs=(torch.randn(2, 8),), r=4)
    before = state(other)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(other, saved[0]), "does not fit",
           "nothing was loaded", "fc1.weight.lora_B", str(saved[0]))
    assert_unchanged(other, before)
    assert files(tmp_path) == saved[1]


def test_adapt_from_adapter_of_another_model(saved, tmp_path):
    torch.manual_seed(0)
    model, x = TinyBlock(), torch.randn(2, 3, 16)
    before = state(model)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.adapt_from_adapter(model, saved[0], example_inputs=(x,)),
           str(saved[0]))
    assert_unchanged(model, before)
    assert files(tmp_path) == saved[1]


class TakesKwargs(torch.nn.Module):
    """Symbolic tracing cannot branch on an optional argument; torch.export can."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x, scale=None, **kwargs):
        h = self.a(x)
        return self.b(h if scale is None else h * scale)


def test_adapt_from_adapter_of_another_model_the_saved_front_end_cannot_trace(saved, tmp_path):
    """The adapter was saved from a symbolic trace; this model needs torch.export: the error is that the adapter does
    not fit, not that tracing failed."""
    model = TakesKwargs()
    before = state(model)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.adapt_from_adapter(model, saved[0],
                                                                         example_inputs=(torch.randn(2, 16),)),
           "does not fit this TakesKwargs", str(saved[0]))
    assert_unchanged(model, before)
    assert files(tmp_path) == saved[1]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_weights_file(adapted, saved, tmp_path, damage):
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
def test_corrupt_config_file(adapted, saved, tmp_path, text, words):
    path = saved[0] / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "adapter_config.json", *words)
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


@pytest.mark.parametrize("field, value", [
    ("dropout", 1.5), ("dropout", "high"), ("weight", 3), ("role", {"q": 1}), ("role", [1]), ("site_rows", "all"),
    ("site_rows", [4, 2]), ("site_rows", [[0, 2]]), ("num_experts", -2), ("num_experts", True),
    ("layout", "sideways"), ("kind", "attention"),
])
@pytest.mark.parametrize("call", ["load_adapter", "adapt_from_adapter"])
def test_config_field_of_the_wrong_kind(eval_mlp, adapted, saved, tmp_path, field, value, call):
    """A hand-edited per-weight field is named with the weight it belongs to, before anything is built or loaded."""
    path = saved[0] / "adapter_config.json"
    config = json.loads(path.read_text())
    first = next(iter(config["weights"]))
    config["weights"][first][field] = value
    path.write_text(json.dumps(config))
    model, args = eval_mlp
    target = adapted if call == "load_adapter" else model
    on_disk, before = files(tmp_path), state(target)
    run = (lambda: lora_fx.load_adapter(adapted, saved[0])) if call == "load_adapter" else \
        (lambda: lora_fx.adapt_from_adapter(model, saved[0], example_inputs=args))
    expect(lora_fx.AdapterFileError, run, "adapter_config.json", "malformed", f"{first}: {field}=")
    assert_unchanged(target, before)
    assert files(tmp_path) == on_disk


def _rewrite(folder: Path, change) -> None:
    tensors = safetensors.torch.load_file(str(folder / "adapter.safetensors"))
    safetensors.torch.save_file(change(tensors), str(folder / "adapter.safetensors"))


def test_adapter_file_with_wrong_dtype(adapted, saved, tmp_path):
    _rewrite(saved[0], lambda t: {k: (v * 100).to(torch.int32) for k, v in t.items()})
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "dtype int32", "float32")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


def test_adapter_file_with_wrong_shape(adapted, saved, tmp_path):
    _rewrite(saved[0], lambda t: {k: (torch.zeros(v.shape[0] + 1, v.shape[1]) if k == "fc1.weight.lora_A" else v)
                                  for k, v in t.items()})
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "fc1.weight.lora_A",
           "(5, 8)", "(4, 8)")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


def test_adapter_file_with_nan(adapted, saved, tmp_path):
    _rewrite(saved[0], lambda t: {k: (torch.full_like(v, float("nan")) if k == "fc2.weight.lora_B" else v)
                                  for k, v in t.items()})
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "fc2.weight.lora_B",
           "NaN or Inf", "nothing was loaded")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


def test_save_adapter_with_nan(adapted, saved, tmp_path):
    with torch.no_grad():
        adapted.lora_fx["fc2"].lora_B[0, 0] = float("nan")
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, saved[0]), "NaN or Inf", "fc2")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


def test_adapter_folder_or_file_missing(adapted, saved, tmp_path):
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, tmp_path / "nope"),
           "does not exist", "nope")
    (saved[0] / "adapter.safetensors").unlink()
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "adapter.safetensors",
           "missing")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


def test_load_while_merged(adapted, saved, tmp_path):
    lora_fx.merge_adapter(adapted)
    before = state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "merged", "unmerge_adapter")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == saved[1]


def test_save_where_the_parent_is_a_regular_file(adapted, tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    on_disk = files(tmp_path)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, tmp_path / "blocker" / "adapter"),
           "blocker")
    assert files(tmp_path) == on_disk


def test_save_into_a_folder_with_other_files(adapted, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    on_disk = files(tmp_path)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, tmp_path / "mine"), "notes.txt",
           "own folder")
    assert files(tmp_path) == on_disk


def test_save_where_the_target_is_a_file(adapted, tmp_path):
    (tmp_path / "adapter").write_text("x")
    on_disk = files(tmp_path)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, tmp_path / "adapter"), "not a folder")
    assert files(tmp_path) == on_disk


@pytest.mark.parametrize("where", ["safetensors", "rename", "exchange"])
def test_disk_error_during_save(adapted, saved, tmp_path, monkeypatch, where):
    """A save over an existing adapter fails midway: the old adapter stays byte for byte, no temp folder is left."""
    import lora_fx.atomic as af

    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_A.add_(1.0)  # the new save would differ from the old files
    if where == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    elif where == "rename":
        monkeypatch.setattr(af, "_exchange", lambda a, b: False)  # the non-Linux path: rename aside, rename in
        monkeypatch.setattr(os, "rename", disk_full)
    else:
        monkeypatch.setattr(af, "_exchange", disk_full)
    before = state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, saved[0]), "saving failed",
           "No space left", str(saved[0]))
    monkeypatch.undo()
    assert files(tmp_path) == saved[1]
    assert_unchanged(adapted, before)


