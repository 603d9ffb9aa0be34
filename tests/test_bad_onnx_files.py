"""Bad inputs, ONNX files: oNNX files that are not ONNX or missing, exports with wrong inputs or nowhere to go.

What each case checks: tests/bad_inputs.py.
"""

from __future__ import annotations

import os

import pytest
import torch

import lora_fx

from bad_inputs import disk_full, state, assert_unchanged, files, expect


@pytest.mark.parametrize("content", [b"not onnx at all \x00\x01", b"", b"\x08\x07" * 3])
def test_verify_a_file_that_is_not_onnx(tmp_path, content):
    (tmp_path / "bad.onnx").write_bytes(content)
    on_disk = files(tmp_path)
    expect(lora_fx.VerifyError, lambda: lora_fx.verify_onnx(tmp_path / "bad.onnx", tmp_path / "bad.onnx"),
           "not a valid ONNX model", "bad.onnx")
    assert files(tmp_path) == on_disk


def test_verify_a_missing_file(tmp_path):
    expect(lora_fx.VerifyError, lambda: lora_fx.verify_onnx(tmp_path / "base.onnx", tmp_path / "merged.onnx"),
           "does not exist", "base.onnx")
    assert files(tmp_path) == {}


def test_parity_on_a_file_that_is_not_onnx(eval_mlp, tmp_path):
    model, args = eval_mlp
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    expect(lora_fx.LoraFxError, lambda: lora_fx.check_parity(tmp_path / "bad.onnx", model, args, device="cpu"),
           "bad.onnx")


def test_parity_on_a_missing_file(eval_mlp, tmp_path):
    model, args = eval_mlp
    expect(lora_fx.InputError, lambda: lora_fx.check_parity(tmp_path / "no.onnx", model, args, device="cpu"),
           "does not exist", "no.onnx")


@pytest.mark.parametrize("inputs", [(torch.randn(3, 5),), (torch.randn(4, 8), torch.randn(4, 8)), ("abc",)])
def test_export_with_inputs_of_the_wrong_shape(eval_mlp, tmp_path, inputs):
    model, _ = eval_mlp
    before = state(model)
    expect(lora_fx.InputError, lambda: lora_fx.export_onnx(model, tmp_path / "m.onnx", inputs), "do not fit",
           "TinyMLP.forward")
    assert_unchanged(model, before)
    assert files(tmp_path) == {}


def test_export_not_a_module(tmp_path):
    expect(lora_fx.InputError, lambda: lora_fx.export_onnx("m", tmp_path / "m.onnx", (torch.ones(1, 8),)), "str")
    assert files(tmp_path) == {}


def test_export_where_the_parent_is_a_regular_file(eval_mlp, tmp_path):
    model, args = eval_mlp
    (tmp_path / "blocker").write_text("x")
    on_disk = files(tmp_path)
    expect(lora_fx.ExportError, lambda: lora_fx.export_onnx(model, tmp_path / "blocker" / "m.onnx", args),
           "not a directory", "blocker")
    assert files(tmp_path) == on_disk


def test_export_to_a_directory_path(eval_mlp, tmp_path):
    model, args = eval_mlp
    (tmp_path / "out").mkdir()
    on_disk = files(tmp_path)
    expect(lora_fx.ExportError, lambda: lora_fx.export_onnx(model, tmp_path / "out", args), "is a directory")
    assert files(tmp_path) == on_disk


def test_disk_error_while_moving_the_export_into_place(eval_mlp, tmp_path, monkeypatch):
    model, args = eval_mlp
    (tmp_path / "m.onnx").write_bytes(b"previous export")
    on_disk, before = files(tmp_path), state(model)
    monkeypatch.setattr(os, "replace", disk_full)
    try:
        expect(lora_fx.ExportError, lambda: lora_fx.export_onnx(model, tmp_path / "m.onnx", args),
               "No space left", "m.onnx")
    finally:
        monkeypatch.undo()
        assert files(tmp_path) == on_disk  # the previous file kept, no temp folder left
        assert_unchanged(model, before)




def test_parity_of_a_file_the_provider_has_no_kernel_for(tmp_path):
    """A float64 export is valid ONNX, but ONNX Runtime's CPU provider has no double Erf (GELU): the error says the
    dtype is the problem and how to fix it, not that the file is broken."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    path = lora_fx.export_onnx(model, tmp_path / "f64.onnx", (x,))
    message = expect(lora_fx.InputError, lambda: lora_fx.check_parity(path, model, (x,), device="cpu"),
                     "no kernel", "Erf", "float32", str(path))
    assert "truncated" not in message
