"""ONNX-level fold (issue 5): lora_fx.onnx_fold.fold_onnx folds the LoRA branches of an UNMERGED export.

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
from lora_fx.onnx_fold import FoldOnnxReport, fold_onnx
from tests.conftest import TinyBlock, TinyMLP, randomize_lora

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


# ------------------------------------------------------------------------------------------------ hand-built graphs
D_IN, D_OUT, R = 6, 5, 2


def lora_model(*, base: str = "matmul_bias", branch: str = "matmul", scaled: bool = True, swap: bool = False,
               a_input: bool = False, b_transposed: bool = False, b_value: float | None = None,
               base_read_twice: bool = False, dtype=np.float32, w_scale: float = 1.0, seed: int = 0):
    """A one-branch graph the way exporters write it. base: matmul | matmul_bias | gemm_t (transB=1, the nn.Linear
    2-D form) | gemm_n (transB=0, GPT-2's Conv1D); branch: matmul (A, B stored in x·M form) | gemm (transB=1)."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    three_d = base.startswith("matmul")
    x_shape = [2, 3, D_IN] if three_d else [4, D_IN]
    with np.errstate(over="ignore"):
        wm = (rng.standard_normal((D_IN, D_OUT)) * w_scale).astype(dtype)  # x·Wm form
    am = rng.standard_normal((D_IN, R)).astype(dtype)
    bm = (rng.standard_normal((R, D_OUT)) if b_value is None else np.full((R, D_OUT), b_value)).astype(dtype)
    inits = [numpy_helper.from_array(wm.T.copy() if base == "gemm_t" else wm, "W"),
             numpy_helper.from_array(np.array(2.0, dtype), "scaling")]
    if base != "matmul":
        inits.append(numpy_helper.from_array(rng.standard_normal(D_OUT).astype(dtype), "bias"))
    a_stored = am if branch == "matmul" else am.T.copy()
    b_stored = bm if branch == "matmul" else bm.T.copy()
    inputs = [helper.make_tensor_value_info("x", elem, x_shape)]
    if a_input:
        inputs.append(helper.make_tensor_value_info("m.lora_A", elem, list(a_stored.shape)))
    else:
        inits.append(numpy_helper.from_array(a_stored, "m.lora_A"))
    nodes = []
    if b_transposed:  # B computed from another initializer: not a constant initializer itself
        inits.append(numpy_helper.from_array(b_stored.T.copy(), "m.lora_B_t"))
        nodes.append(helper.make_node("Transpose", ["m.lora_B_t"], ["m.lora_B"], perm=[1, 0]))
    else:
        inits.append(numpy_helper.from_array(b_stored, "m.lora_B"))
    if base.startswith("matmul"):
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y0"]))
        if base == "matmul_bias":
            nodes.append(helper.make_node("Add", ["bias", "y0"] if swap else ["y0", "bias"], ["y1"]))
    else:
        nodes.append(helper.make_node("Gemm", ["x", "W", "bias"], ["y1"], transB=1 if base == "gemm_t" else 0))
    base_out = "y0" if base == "matmul" else "y1"
    if branch == "matmul":
        nodes += [helper.make_node("MatMul", ["x", "m.lora_A"], ["down"]),
                  helper.make_node("MatMul", ["down", "m.lora_B"], ["up"])]
    else:
        nodes += [helper.make_node("Gemm", ["x", "m.lora_A"], ["down"], transB=1),
                  helper.make_node("Gemm", ["down", "m.lora_B"], ["up"], transB=1)]
    delta = "up"
    if scaled:
        nodes.append(helper.make_node("Mul", ["scaling", "up"] if swap else ["up", "scaling"], ["scaled"]))
        delta = "scaled"
    nodes.append(helper.make_node("Add", [delta, base_out] if swap else [base_out, delta], ["y"]))
    for node in nodes:  # named, with the module path the torch exporter records (for report lines and keep=)
        node.name = f"node_{node.output[0]}"
        helper.set_metadata_props(node, {"namespace": f"m: torch.nn.modules.linear.Linear/{node.output[0]}"})
    y_shape = x_shape[:-1] + [D_OUT]
    outputs = [helper.make_tensor_value_info("y", elem, y_shape)]
    if base_read_twice:
        nodes.append(helper.make_node("Relu", [base_out], ["side"]))
        outputs.append(helper.make_tensor_value_info("side", elem, y_shape))
    graph = helper.make_graph(nodes, "lora", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(model)
    feed = {"x": rng.standard_normal(x_shape).astype(dtype)}
    if a_input:
        feed["m.lora_A"] = a_stored
    return model, feed


def fold_model(tmp_path, model, **kwargs) -> tuple[FoldOnnxReport, onnx.ModelProto]:
    onnx.save(model, str(tmp_path / "in.onnx"))
    report = fold_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", **kwargs)
    return report, onnx.load(str(tmp_path / "out.onnx"))


@pytest.mark.parametrize("base,branch,scaled,swap", [
    ("matmul", "matmul", True, False), ("matmul_bias", "matmul", True, True), ("matmul_bias", "matmul", False, False),
    ("gemm_t", "gemm", True, False), ("gemm_n", "gemm", True, True), ("gemm_n", "gemm", False, False),
])
def test_every_branch_shape_folds_to_the_base_graph_and_keeps_the_function(tmp_path, base, branch, scaled, swap):
    model, feed = lora_model(base=base, branch=branch, scaled=scaled, swap=swap)
    report, folded = fold_model(tmp_path, model)
    assert (report.folded, report.rejected) == (1, []), str(report)
    assert sorted(n.op_type for n in folded.graph.node) == sorted(
        {"matmul": ["MatMul"], "matmul_bias": ["MatMul", "Add"]}.get(base, ["Gemm"]))
    assert {i.name for i in folded.graph.initializer} == ({"W"} if base == "matmul" else {"W", "bias"})
    want, got = ort_outputs(model, feed)[0], ort_outputs(folded, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # base nodes are kept as they were (input order, attributes, names)
    base_nodes = [n for n in model.graph.node if n.output[0] in ("y0", "y1")]
    assert [(n.name, list(n.input), n.attribute) for n in base_nodes] == \
        [(n.name, list(n.input), n.attribute) for n in folded.graph.node]


@pytest.mark.parametrize("kwargs,reason", [
    (dict(a_input=True), "lora_A 'm.lora_A' is a graph input"),
    (dict(b_transposed=True), "lora_B 'm.lora_B' is not a constant initializer (the output of a Transpose node)"),
    (dict(b_value=float("nan")), "lora_B of this branch holds NaN or Inf"),
    (dict(base_read_twice=True), "the base output 'y1' is also read outside the LoRA Add"),
    (dict(dtype=np.float16, w_scale=60000.0, b_value=1000.0), "overflows FLOAT16"),
])
def test_refusals_say_why_and_change_nothing(tmp_path, kwargs, reason):
    model, feed = lora_model(**kwargs)
    report, folded = fold_model(tmp_path, model)
    assert report.folded == 0 and len(report.rejected) == 1, str(report)
    assert reason in report.rejected[0], report.rejected
    assert len(folded.graph.node) == len(model.graph.node)
    w = lambda m: numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "W"))  # noqa: E731
    np.testing.assert_array_equal(w(folded), w(model))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_weights_get_the_exact_sum_rounded_once(tmp_path, dtype):
    import ml_dtypes
    np_dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    model, _ = lora_model(base="matmul")
    arrays = {}
    for init in model.graph.initializer:  # the same graph with every weight in `dtype`
        arrays[init.name] = numpy_helper.to_array(init).astype(np_dtype)
        init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype))
    report, folded = fold_model(tmp_path, model)
    assert (report.folded, report.rejected) == (1, [])
    (w,) = [numpy_helper.to_array(i) for i in folded.graph.initializer if i.name == "W"]
    exact = arrays["W"].astype(np.float64) + float(arrays["scaling"]) * (
        arrays["m.lora_A"].astype(np.float64) @ arrays["m.lora_B"].astype(np.float64))
    assert w.dtype == np_dtype
    np.testing.assert_array_equal(w, exact.astype(np_dtype))


def test_keep_leaves_matching_branches_and_reports_them_as_kept(tmp_path):
    model, feed = lora_model()
    report, folded = fold_model(tmp_path, model, keep="^m$")
    assert (report.folded, report.rejected, report.kept) == (0, [], ["m (node_y)"])
    assert len(folded.graph.node) == len(model.graph.node)
    report, _ = fold_model(tmp_path, model, keep="^other$")
    assert report.folded == 1 and report.kept == []
    with pytest.raises(InputError, match="keep"):
        fold_model(tmp_path, model, keep="(")


def test_fx_style_names_are_renumbered_as_the_base_export_numbers_them(tmp_path):
    """fp16 exports name constants after FX nodes (scalar_tensor_default, _1, ...), numbered over the whole FX graph;
    the exporter merges equal constants into the first one's name. LoRA's scalings take numbers the base export
    never used, so once they are gone the later constants are renumbered down by the LoRA FX nodes before them
    (read from the FX node each ONNX node records)."""
    model, feed = lora_model()
    for init in model.graph.initializer:
        if init.name == "scaling":
            init.name = "scalar_tensor_default"
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "scalar_tensor_default_3"))
    for node in model.graph.node:
        node.input[:] = ["scalar_tensor_default" if i == "scaling" else i for i in node.input]
        if node.op_type == "Mul":  # the LoRA scaling; FX node scalar_tensor_default_1 was merged into _0's name
            helper.set_metadata_props(node, {"pkg.torch.onnx.fx_node": "%mul : [num_users=1] = call_function[target="
                                             "torch.ops.aten.mul.Tensor](args = (%up, %scalar_tensor_default_1), kw"})
    tail = helper.make_node("Mul", ["y", "scalar_tensor_default_3"], ["z"], name="node_z")
    helper.set_metadata_props(tail, {"pkg.torch.onnx.fx_node": "%z : [num_users=1] = call_function[target=torch.ops."
                                     "aten.mul.Tensor](args = (%y, %scalar_tensor_default_3), kwargs = {})"})
    model.graph.node.append(tail)
    model.graph.output[0].name = "z"
    onnx.checker.check_model(model)
    report, folded = fold_model(tmp_path, model)
    assert report.folded == 1
    # LoRA's FX names: scalar_tensor_default_1 (from the Mul's metadata); _0's initializer is gone too but its FX
    # name is not recorded by any node here, so only _1 counts: 3 -> 2
    assert {i.name for i in folded.graph.initializer} == {"W", "bias", "scalar_tensor_default_2"}
    np.testing.assert_allclose(ort_outputs(folded, feed)[0], ort_outputs(model, feed)[0], rtol=1e-5, atol=1e-5)


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
