"""The ONNX fold's rewrite rule (lora_fx/passes/onnx_fold_rule.py) on hand-built one-branch graphs: every branch
shape the exporter writes folds to the base graph with the same function, every refusal says why and changes
nothing, low-precision weights get the exact sum rounded once, keep= leaves branches, and constants named after FX
nodes are renumbered as the base export numbers them (lora_fx/passes/onnx_fx_names.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from lora_fx.errors import InputError
from lora_fx.onnx.fold import FoldOnnxReport, fold_onnx


def ort_outputs(model_or_path, feed: dict) -> list[np.ndarray]:
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)


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
