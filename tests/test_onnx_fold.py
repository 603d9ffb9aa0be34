"""ONNX-level fold (issue 5): lora_fx.fold_onnx folds the LoRA branches of an UNMERGED export.

Real exports (lora_fx.export_onnx) of small models: the folded file must verify IDENTICAL to the base export made with
the same settings, and compute what the lora_fx.fold'ed PyTorch model computes (ONNX Runtime, CPU). Hand-built ONNX
graphs cover the shapes the exporter makes rarely (Gemm transB=0, no scaling Mul, operands swapped) and every refusal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lora_fx
from lora_fx.errors import ExportError, InputError
from lora_fx.onnx.fold import FoldOnnxReport, fold_onnx
from tests.conftest import TinyBlock, TinyMLP, randomize_lora
from tests.test_onnx_fold_rule import lora_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ helpers
def weights_in_use_order(path) -> list[np.ndarray]:
    """Floating initializers in the order nodes first read them: aligns the anonymous val_N of two files."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    seen, out = set(), []
    for node in model.graph.node:
        for name in node.input:
            if name in inits and name not in seen and inits[name].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
                seen.add(name)
                out.append(numpy_helper.to_array(inits[name]))
    return out


def initializer_names(path) -> set[str]:
    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer}


def ulps(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in units in the last place between two same-dtype float arrays."""
    assert a.dtype == b.dtype and a.shape == b.shape
    ints = {np.dtype(np.float32): np.int32, np.dtype(np.float16): np.int16}[a.dtype]
    return int(np.max(np.abs(a.view(ints).astype(np.int64) - b.view(ints).astype(np.int64)))) if a.size else 0


def ort_outputs(model_or_path, feed: dict) -> list[np.ndarray]:
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Base and unmerged exports of TinyMLP (2-D inputs: Gemm) and TinyBlock (3-D inputs, dynamic batch and sequence:
    MatMul on val_N initializers, a matmul on a parameter stored (in, out), F.linear), the block with all linears
    and with q,v only; the lora_fx.fold'ed modules (fp32 and fp64 accumulation) to compare with."""
    d = tmp_path_factory.mktemp("onnx_fold")
    torch.manual_seed(0)
    out = {"dir": d}
    mlp, x_mlp = TinyMLP(), torch.randn(4, 8)
    block, x_block = TinyBlock(), torch.randn(2, 5, 16)
    for name, model, x, rules in (("mlp", mlp, x_mlp, None), ("block", block, x_block, None),
                                  ("block_qv", block, x_block, [lora_fx.Rule(name="q|v", r=4)])):
        dynamic = name.startswith("block")
        adapted = lora_fx.adapt(model, rules, example_inputs=(x,), r=2 if name == "mlp" else 4)
        randomize_lora(adapted, 0.2)
        if not name.endswith("_qv"):
            lora_fx.export_onnx(model, d / f"{name}_base.onnx", (x,), dynamic=dynamic)
            out[f"{name}_merged"] = lora_fx.fold(adapted)
            out[f"{name}_merged64"] = lora_fx.fold(adapted, accumulate_dtype=torch.float64)
        lora_fx.export_onnx(adapted, d / f"{name}_unmerged.onnx", (x,), dynamic=dynamic)
        out[f"{name}_x"], out[f"{name}_adapted"] = x, adapted
    return out


def nearest_parameter(array: np.ndarray, module: nn.Module) -> np.ndarray:
    """The parameter of `module` (or its transpose: the exporter stores Wᵀ for MatMul) closest to `array`."""
    candidates = []
    for p in module.parameters():
        w = p.detach().numpy()
        for c in (w, w.T):
            if c.shape == array.shape:
                candidates.append(c)
    return min(candidates, key=lambda c: float(np.max(np.abs(c.astype(np.float64) - array))))


# ------------------------------------------------------------------------------------------------ real exports
@pytest.mark.parametrize("name,branches", [("mlp", 2), ("block", 6)])
def test_fold_verifies_identical_to_the_base_export_and_matches_the_torch_fold(exports, name, branches):
    d = exports["dir"]
    report = fold_onnx(d / f"{name}_unmerged.onnx", d / f"{name}_folded.onnx")
    assert isinstance(report, FoldOnnxReport)
    assert (report.folded, report.rejected) == (branches, []), str(report)
    verify = lora_fx.verify_onnx(d / f"{name}_base.onnx", d / f"{name}_folded.onnx")
    assert verify.identical, str(verify)
    # named initializers (e.g. fc1.weight, w_up) keep their names; every A, B and scaling is gone
    assert initializer_names(d / f"{name}_folded.onnx") - initializer_names(d / f"{name}_base.onnx") <= {
        n for n in initializer_names(d / f"{name}_folded.onnx") if n.startswith("val_")}
    assert not any("lora" in n for n in initializer_names(d / f"{name}_folded.onnx"))
    parity = lora_fx.check_parity(d / f"{name}_folded.onnx", exports[f"{name}_merged"], (exports[f"{name}_x"],),
                                  device="cpu")
    assert parity.ok and parity.max_abs_err < 1e-5, str(parity)
    # graph outputs keep the names the unmerged file gave them (callers fetch outputs by name)
    outputs = lambda p: [o.name for o in onnx.load(str(p)).graph.output]  # noqa: E731
    assert outputs(d / f"{name}_folded.onnx") == outputs(d / f"{name}_unmerged.onnx")


@pytest.mark.parametrize("name", ["mlp", "block"])
def test_fp64_accumulation_rounds_once_and_fp32_matches_lora_fx_fold_to_rounding(exports, name):
    d = exports["dir"]
    fold_onnx(d / f"{name}_unmerged.onnx", d / f"{name}_f64.onnx")  # default: float64
    fold_onnx(d / f"{name}_unmerged.onnx", d / f"{name}_f32.onnx", accumulate_dtype=np.float32)
    changed = 0
    folded64, folded32 = weights_in_use_order(d / f"{name}_f64.onnx"), weights_in_use_order(d / f"{name}_f32.onnx")
    for a64, a32, base in zip(folded64, folded32, weights_in_use_order(d / f"{name}_base.onnx")):
        if a64.ndim != 2:
            continue
        changed += int(not np.array_equal(a64, base))
        # fp64: the exact W + s·B·A rounded once, like lora_fx.fold(accumulate_dtype=torch.float64): the same bits
        assert ulps(a64, nearest_parameter(a64, exports[f"{name}_merged64"])) == 0
        # fp32: the r products are summed in another order than torch's BLAS: apart by rounding only (where W + delta
        # cancels, an ulp of the operands is many ulps of the result, so compare against the tensor's scale)
        t32 = nearest_parameter(a32, exports[f"{name}_merged"])
        assert np.max(np.abs(a32 - t32)) <= 4 * np.finfo(np.float32).eps * np.max(np.abs(t32))
    assert changed == {"mlp": 2, "block": 6}[name]


def test_a_subset_of_linears_folds_and_partial_fold_keeps_what_is_asked(exports):
    d = exports["dir"]
    report = fold_onnx(d / "block_qv_unmerged.onnx", d / "block_qv_folded.onnx")
    assert (report.folded, report.rejected) == (2, [])
    assert lora_fx.verify_onnx(d / "block_base.onnx", d / "block_qv_folded.onnx").identical
    # keep=: fold all but q and v of the all-linears file -> the graph a q,v adapter exports (benchmark relies on it)
    kept = fold_onnx(d / "block_unmerged.onnx", d / "block_all_but_qv.onnx", keep=r"^(q|v)$")
    assert (kept.folded, kept.rejected, len(kept.kept)) == (4, [], 2), str(kept)
    assert lora_fx.verify_onnx(d / "block_qv_unmerged.onnx", d / "block_all_but_qv.onnx").identical
    # a partial fold computes what the unmerged model computes
    parity = lora_fx.check_parity(d / "block_all_but_qv.onnx", exports["block_adapted"], (exports["block_x"],),
                                  device="cpu")
    assert parity.ok, str(parity)


def test_dynamic_axes_survive_the_fold(exports):
    d = exports["dir"]
    fold_onnx(d / "block_unmerged.onnx", d / "block_dynamic.onnx")
    dims = [[dim.dim_param or dim.dim_value for dim in v.type.tensor_type.shape.dim]
            for v in onnx.load(str(d / "block_dynamic.onnx")).graph.input]
    assert dims == [["batch", "sequence", 16]]
    for shape in ((3, 7, 16), (1, 2, 16)):
        parity = lora_fx.check_parity(d / "block_dynamic.onnx", exports["block_merged"], (torch.randn(*shape),),
                                      device="cpu")
        assert parity.ok, str(parity)


def test_fp16_export_folds_identically(tmp_path):
    torch.manual_seed(0)
    model, x = TinyBlock(), torch.randn(2, 5, 16)
    adapted = lora_fx.adapt(model, None, example_inputs=(x,), r=4)
    randomize_lora(adapted, 0.2)
    lora_fx.export_onnx(model, tmp_path / "base16.onnx", (x,), dtype=torch.float16)
    lora_fx.export_onnx(adapted, tmp_path / "unmerged16.onnx", (x,), dtype=torch.float16)
    report = fold_onnx(tmp_path / "unmerged16.onnx", tmp_path / "folded16.onnx")
    assert (report.folded, report.rejected) == (6, []), str(report)
    verify = lora_fx.verify_onnx(tmp_path / "base16.onnx", tmp_path / "folded16.onnx")
    assert verify.identical, str(verify)
    assert all(w.dtype == np.float16 for w in weights_in_use_order(tmp_path / "folded16.onnx"))
    parity = lora_fx.check_parity(tmp_path / "folded16.onnx", lora_fx.fold(adapted), (x,), device="cpu")
    assert parity.ok, str(parity)


def test_half_model_with_fp32_lora_folds_through_the_casts(tmp_path):
    """LoRA weights stay fp32 beside an fp16 model (as PEFT keeps them): the branch is Cast -> fp32 math -> Cast, and
    the exporter shares one Cast of x between the q/k/v branches."""
    torch.manual_seed(0)
    model, x = TinyBlock().half(), torch.randn(2, 5, 16).half()
    adapted = lora_fx.adapt(model, [lora_fx.Rule(name="q|k|v", r=4)], example_inputs=(x,))
    assert adapted.lora_fx.q.lora_A.dtype == torch.float32
    randomize_lora(adapted, 0.2)
    lora_fx.export_onnx(model, tmp_path / "base.onnx", (x,))
    lora_fx.export_onnx(adapted, tmp_path / "unmerged.onnx", (x,))
    assert any(n.op_type == "Cast" for n in onnx.load(str(tmp_path / "unmerged.onnx")).graph.node)
    report = fold_onnx(tmp_path / "unmerged.onnx", tmp_path / "folded.onnx")
    assert (report.folded, report.rejected) == (3, []), str(report)
    assert lora_fx.verify_onnx(tmp_path / "base.onnx", tmp_path / "folded.onnx").identical
    parity = lora_fx.check_parity(tmp_path / "folded.onnx", lora_fx.fold(adapted), (x,), device="cpu")
    assert parity.ok, str(parity)


class _Twice(nn.Module):
    """One weight at two call sites: lora_fx gives it one LoRA, called at both."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.out(self.fc(torch.relu(self.fc(x))))


def test_a_weight_at_two_sites_folds_at_both(tmp_path):
    """The exporter gives each call site its own transposed copy of W (it merges equal weight matrices by value
    only when they are small, and export_onnx never does), so each site's branch folds into its own copy."""
    torch.manual_seed(0)
    model, x = _Twice(), torch.randn(2, 5, 16)
    adapted = lora_fx.adapt(model, None, example_inputs=(x,), r=4)
    randomize_lora(adapted, 0.2)
    lora_fx.export_onnx(model, tmp_path / "base.onnx", (x,))
    lora_fx.export_onnx(adapted, tmp_path / "unmerged.onnx", (x,))
    report = fold_onnx(tmp_path / "unmerged.onnx", tmp_path / "folded.onnx")
    assert (report.folded, report.rejected) == (3, []), str(report)
    assert lora_fx.verify_onnx(tmp_path / "base.onnx", tmp_path / "folded.onnx").identical
    parity = lora_fx.check_parity(tmp_path / "folded.onnx", lora_fx.fold(adapted), (x,), device="cpu")
    assert parity.ok, str(parity)


# ------------------------------------------------------------------------------------------------ files
def test_errors_and_atomic_writes(tmp_path):
    model, _ = lora_model()
    onnx.save(model, str(tmp_path / "in.onnx"))
    with pytest.raises(InputError, match="does not exist"):
        fold_onnx(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not an onnx file")
    (tmp_path / "out.onnx").write_bytes(b"previous")
    with pytest.raises(InputError, match="cannot read"):
        fold_onnx(tmp_path / "garbage.onnx", tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == b"previous"  # untouched
    with pytest.raises(ExportError, match="does not exist"):
        fold_onnx(tmp_path / "in.onnx", tmp_path / "no_dir" / "out.onnx")
    with pytest.raises(InputError, match="accumulate_dtype"):
        fold_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", accumulate_dtype=np.float16)
    assert (tmp_path / "out.onnx").read_bytes() == b"previous"
    report = fold_onnx(tmp_path / "in.onnx", tmp_path / "in.onnx")  # in place
    assert report.folded == 1 and len(onnx.load(str(tmp_path / "in.onnx")).graph.node) == 2
    assert sorted(os.listdir(tmp_path)) == ["garbage.onnx", "in.onnx", "out.onnx"]  # no temporary left behind


# ------------------------------------------------------------------------------------------------ transformers
def _tiny_hf(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=128, n_positions=64, n_embd=32, n_layer=1, n_head=2, use_cache=False))
    return model.eval(), torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind,branches", [
    pytest.param("bert", 7, id="bert"),
    pytest.param("gpt2", 4, id="gpt2-conv1d", marks=pytest.mark.slow),
])
def test_transformers_models_fold_identically(tmp_path, kind, branches):
    model, ids = _tiny_hf(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rules=None skips GPT-2's tied lm_head with a warning
        adapted = lora_fx.adapt(model, None, example_inputs=(ids,), r=4, frontend="export")
    randomize_lora(adapted, 0.2)
    lora_fx.export_onnx(model, tmp_path / "base.onnx", (ids,))
    lora_fx.export_onnx(adapted, tmp_path / "unmerged.onnx", (ids,))
    report = fold_onnx(tmp_path / "unmerged.onnx", tmp_path / "folded.onnx")
    assert (report.folded, report.rejected) == (branches, []), str(report)
    verify = lora_fx.verify_onnx(tmp_path / "base.onnx", tmp_path / "folded.onnx")
    assert verify.identical, str(verify)
    parity = lora_fx.check_parity(tmp_path / "folded.onnx", lora_fx.fold(adapted), (ids,), device="cpu")
    assert parity.ok, str(parity)



# ------------------------------------------------------------------------------------------------ benchmark
@pytest.mark.slow
def test_latency_benchmark_tiny_smoke(tmp_path):
    out = tmp_path / "latency.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "onnx_latency.py"), "--tiny", "--models", "bert",
           "--jobs", "1", "--rounds", "1", "--iters", "1", "--warmup", "1", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ONNX Runtime (CPUExecutionProvider" in run.stdout and "Total run time" in run.stdout
    results = json.loads(out.read_text())
    (group,) = results["groups"]
    records = group["records"]
    assert records["merged"]["verify_identical"] and records["onnx_folded"]["verify_identical"]
    assert records["unmerged_qv_r4"]["kept"] == 4 and records["onnx_folded"]["rejected"] == []
    ort_nodes = group["ort"]["ort_nodes"]
    assert ort_nodes["base"] == ort_nodes["merged"]
    assert set(group["ort"]["timings"]) == {"1x16", "2x32"}
    assert {"base", "base_again", "merged", "onnx_folded", "unmerged_qv_r4", "unmerged_all_r4"} <= set(
        group["ort"]["timings"]["1x16"])
    assert set(group["eager"]["timings"]["1x16"]) >= {"base", "base_traced", "merged", "unmerged_all_r4"}
    assert group["ort"]["checks"]["max_abs(merged-onnx_folded)"] < 1e-5


# ------------------------------------------------------------------------------------------------ external data
def _external_copy(source, path, location: str) -> None:
    onnx.save(onnx.load(str(source)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)


def test_a_model_saved_with_external_data_folds_and_keeps_the_layout(exports, tmp_path):
    """Every model saved with external data used to fail ("Data of TensorProto ... should be stored in ...")."""
    d, x = exports["dir"], exports["mlp_x"].numpy()
    _external_copy(d / "mlp_unmerged.onnx", tmp_path / "in.onnx", "in.weights")
    report = fold_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert report.ok and report.folded == 2, str(report)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "in.weights", "out.onnx", "out.onnx.data"]
    out = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    external = {i.name for i in out.graph.initializer if i.data_location == TensorProto.EXTERNAL}
    assert "fc1.weight" in external  # (onnx_ir keeps tensors of up to 256 bytes inline)
    assert lora_fx.verify_onnx(d / "mlp_base.onnx", tmp_path / "out.onnx").identical
    inline = fold_onnx(d / "mlp_unmerged.onnx", tmp_path / "inline.onnx")
    assert inline.ok
    expected = ort_outputs(tmp_path / "inline.onnx", {"x": x})[0]
    np.testing.assert_array_equal(ort_outputs(tmp_path / "out.onnx", {"x": x})[0], expected)
    # in place: the input's own data file is rewritten, nothing else appears
    assert fold_onnx(tmp_path / "in.onnx", tmp_path / "in.onnx").ok
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "in.weights", "inline.onnx", "out.onnx", "out.onnx.data"]
    np.testing.assert_array_equal(ort_outputs(tmp_path / "in.onnx", {"x": x})[0], expected)


def test_folding_onto_the_inputs_own_data_file_is_refused(exports, tmp_path):
    _external_copy(exports["dir"] / "mlp_unmerged.onnx", tmp_path / "in.onnx", "out.onnx.data")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ExportError, match="would overwrite the external data") as info:
        fold_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert "How to fix:" in str(info.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_folded_model_the_checker_refuses_is_not_blamed_on_the_disk(tmp_path):
    """The input's own fault (an op no opset has) is named as what failed: the checker, not free disk space."""
    model, _ = lora_model()
    model.graph.node.append(helper.make_node("NoSuchOp", ["y"], ["z"]))
    model.graph.output[0].name = "z"
    onnx.save(model, str(tmp_path / "in.onnx"))
    with pytest.raises(ExportError) as info:
        fold_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert "ONNX checker" in info.value.what and "NoSuchOp" in info.value.what
    assert "disk" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


def test_square_weights_stored_in_out_fold_with_the_right_transpose(tmp_path):
    """Square (in, out) weights: a dropped transpose would still fit the shape, only the values show it."""
    from tests.test_fold import SquareInOut

    torch.manual_seed(0)
    model, x = SquareInOut().eval(), torch.randn(4, 16)
    adapted = lora_fx.adapt(model, example_inputs=(x,), frontend="fx", r=4, alpha=8)
    randomize_lora(adapted, 0.3)
    lora_fx.export_onnx(model, tmp_path / "base.onnx", (x,))
    lora_fx.export_onnx(adapted, tmp_path / "unmerged.onnx", (x,))
    report = fold_onnx(tmp_path / "unmerged.onnx", tmp_path / "merged.onnx")
    assert report.ok and report.folded == 2, str(report)
    assert lora_fx.verify_onnx(tmp_path / "base.onnx", tmp_path / "merged.onnx").identical
    with torch.no_grad():
        expected = adapted(x).numpy()
        assert np.abs(expected - model(x).numpy()).max() > 0.5
    got = ort_outputs(tmp_path / "merged.onnx", {ort.InferenceSession(str(tmp_path / "merged.onnx"), providers=[
        "CPUExecutionProvider"]).get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
