"""verify_onnx: exact structural identity of ONNX graphs, differences located by name (real exports, no mocks)."""

from __future__ import annotations

import math
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lora_fx.errors import VerifyError
from lora_fx.onnx.export import export_onnx
from lora_fx.onnx.verify import VerifyReport, verify_onnx


class MLP(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class UnmergedLoraMLP(MLP):
    """The MLP with an unfolded rank-2 LoRA branch on fc1: two MatMuls and an Add next to the Gemms."""

    def __init__(self):
        super().__init__()
        self.lora_a, self.lora_b = nn.Parameter(torch.randn(8, 2)), nn.Parameter(torch.randn(2, 16))

    def forward(self, x):
        h = self.fc1(x) + (x @ self.lora_a) @ self.lora_b
        return self.fc2(self.act(h))


class Block(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (proj(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attention = (q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)).softmax(-1)
        x = x + self.o((attention @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


X = torch.randn(2, 8)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every export this file compares, made once: (name -> path)."""
    out = tmp_path_factory.mktemp("verify")
    torch.manual_seed(0)
    mlp, block = MLP().eval(), Block().eval()
    return {
        "mlp": export_onnx(mlp, out / "mlp.onnx", (X,)),
        "mlp_again": export_onnx(mlp, out / "mlp_again.onnx", (X,)),
        "mlp_narrow": export_onnx(MLP(hidden=12), out / "mlp_narrow.onnx", (X,)),
        "lora": export_onnx(UnmergedLoraMLP(), out / "lora.onnx", (X,)),
        "block": export_onnx(block, out / "block.onnx", (torch.randn(2, 5, 16),)),
        "block_again": export_onnx(block, out / "block_again.onnx", (torch.randn(2, 5, 16),)),
    }


@pytest.mark.parametrize("name", ["mlp", "block"])
def test_two_exports_of_one_model_are_identical(exports, name):
    report = verify_onnx(exports[name], exports[f"{name}_again"])
    assert isinstance(report, VerifyReport)
    assert report.identical and report.differences == [], str(report)
    assert report.base == report.merged and report.base.ops > 0
    assert "IDENTICAL" in str(report)


def test_loaded_protos_verify_like_paths(exports):
    report = verify_onnx(onnx.load(str(exports["block"])), onnx.load(str(exports["block_again"])))
    assert report.identical, str(report)


def test_resized_weight_is_reported_by_initializer_name(exports):
    report = verify_onnx(exports["mlp"], exports["mlp_narrow"])
    assert not report.identical
    assert "initializer 'fc1.weight': shape (16, 8) vs (12, 8)" in report.differences
    assert "initializer 'fc2.weight': shape (4, 16) vs (4, 12)" in report.differences
    assert "DIFFERENT" in str(report) and "fc1.weight" in str(report)


def test_extra_matmul_branch_is_reported(exports):
    report = verify_onnx(exports["mlp"], exports["lora"])
    assert not report.identical
    assert "op histogram: base has 0 MatMul, merged has 2 MatMul" in report.differences, str(report)
    assert any(d.startswith("nodes only in merged:") and "MatMul" in d for d in report.differences)
    assert "initializers only in merged: 'lora_a' FLOAT(8, 2), 'lora_b' FLOAT(2, 16)" in report.differences
    assert report.merged.ops > report.base.ops


def test_differences_are_symmetric_in_wording(exports):
    report = verify_onnx(exports["lora"], exports["mlp"])
    assert "op histogram: base has 2 MatMul, merged has 0 MatMul" in report.differences
    assert "initializers only in base: 'lora_a' FLOAT(8, 2), 'lora_b' FLOAT(2, 16)" in report.differences


def test_missing_file_raises_verify_error_with_path(tmp_path, exports):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(VerifyError, match="does not exist") as info:
        verify_onnx(exports["mlp"], missing)
    assert str(missing) in str(info.value)


def test_invalid_file_raises_verify_error_with_path(tmp_path, exports):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffthis is not a protobuf" * 10)
    with pytest.raises(VerifyError, match="not a valid ONNX model") as info:
        verify_onnx(garbage, exports["mlp"])
    assert str(garbage) in str(info.value) and info.value.fix


def test_proto_failing_the_checker_raises_verify_error():
    broken = _model([helper.make_node("Relu", ["undefined_value"], ["y"])], outputs=["y"])
    with pytest.raises(VerifyError, match="merged"):
        verify_onnx(_model([helper.make_node("Relu", ["x"], ["y"])], outputs=["y"]), broken)


# Hand-built graphs: each isolates one kind of difference.


def _model(nodes, outputs=("y",), inits=(), opset=20, input_dims=("b", 4)):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(input_dims)) for name in outputs],
        list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _w(name="w", shape=(4, 4)):
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def test_intermediate_value_and_node_names_do_not_matter():
    a = _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="n1"), helper.make_node("Relu", ["h"], ["y"])],
               inits=[_w()])
    b = _model([helper.make_node("MatMul", ["x", "w"], ["tmp_7"], name="other"),
                helper.make_node("Relu", ["tmp_7"], ["y"], name="r")], inits=[_w()])
    assert verify_onnx(a, b).identical


def test_initializer_names_matter():
    a = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], inits=[_w("w")])
    b = _model([helper.make_node("MatMul", ["x", "w2"], ["y"])], inits=[_w("w2")])
    report = verify_onnx(a, b)
    assert not report.identical
    assert "initializers only in base: 'w' FLOAT(4, 4)" in report.differences
    assert "initializers only in merged: 'w2' FLOAT(4, 4)" in report.differences


def test_swapped_operands_are_found_with_equal_histograms():
    a = _model([helper.make_node("Sub", ["x", "w"], ["y"])], inits=[_w(shape=(4,))])
    b = _model([helper.make_node("Sub", ["w", "x"], ["y"])], inits=[_w(shape=(4,))])
    report = verify_onnx(a, b)
    assert not report.identical
    assert report.base.ops == report.merged.ops and report.base.edges == report.merged.edges
    assert any("first node of base" in d and "Sub" in d and "'x', 'w'" in d for d in report.differences), str(report)


def test_attribute_opset_and_symbolic_dim_differences():
    base = _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)])
    assert verify_onnx(base, _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)])).identical
    attr = verify_onnx(base, _model([helper.make_node("Softmax", ["x"], ["y"], axis=0)]))
    # the structure of the report: not identical, same sizes, a different graph hash, one difference per kind
    assert attr.identical is False and attr.base.ops == attr.merged.ops == 1
    assert attr.base.fingerprint != attr.merged.fingerprint and attr.base.edges == attr.merged.edges
    assert any("nodes only in merged: 1 x Softmax|ai.onnx|axis=0" in d for d in attr.differences), str(attr)
    opset = verify_onnx(base, _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], opset=19))
    assert opset.identical is False and opset.base == opset.merged  # same graph, other opset
    assert opset.differences == ["opset import 'ai.onnx': base 20 vs merged 19"]
    dims = verify_onnx(base, _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], input_dims=(2, 4)))
    assert dims.identical is False and dims.base.fingerprint != dims.merged.fingerprint
    assert "graph input 0: base FLOAT[b,4] vs merged FLOAT[2,4]" in dims.differences


def test_five_thousand_node_graph_verifies_fast():
    def chain(layers, swap_at=None):
        nodes, inits, prev = [], [], "x"
        for i in range(layers):
            inits += [_w(f"l{i}.w"), _w(f"l{i}.b", (4,))]
            add_inputs = [f"l{i}.b", f"m{i}"] if i == swap_at else [f"m{i}", f"l{i}.b"]
            nodes += [helper.make_node("MatMul", [prev, f"l{i}.w"], [f"m{i}"]),
                      helper.make_node("Add", add_inputs, [f"a{i}"]),
                      helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
            prev = f"r{i}"
        nodes.append(helper.make_node("Identity", [prev], ["y"]))
        return _model(nodes, inits=inits)

    base, same, swapped = chain(1700), chain(1700), chain(1700, swap_at=1000)
    start = time.process_time()  # CPU time of this process: other jobs on the machine do not count
    assert verify_onnx(base, same).identical
    elapsed = time.process_time() - start
    report = verify_onnx(base, swapped)
    assert any("'m1000', 'l1000.b'" in d for d in report.differences), str(report)
    assert elapsed < 1.5, f"verify took {elapsed:.2f}s for {report.base.ops} ops"


def test_small_integer_initializers_are_compared_by_value():
    def reshape(target):
        shape = numpy_helper.from_array(np.array(target, np.int64), "target_shape")
        return _model([helper.make_node("Reshape", ["x", "target_shape"], ["y"])], inits=[shape])

    report = verify_onnx(reshape([2, -1]), reshape([-1, 2]))
    assert report.identical is False and report.base.initializers == report.merged.initializers == 1
    assert report.base.fingerprint != report.merged.fingerprint
    assert "initializer 'target_shape': values [2, -1] vs [-1, 2]" in report.differences, str(report)
    assert verify_onnx(reshape([2, -1]), reshape([2, -1])).identical


def test_constant_node_values_are_structure():
    """Two graphs that differ only in a Constant's value (a Reshape target) compute different shapes."""
    def reshape(target):
        return _model([helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(
            np.array(target, np.int64))), helper.make_node("Reshape", ["x", "shape"], ["y"])])

    same = verify_onnx(reshape([2, 8]), reshape([2, 8]))
    assert same.identical and same.differences == []
    report = verify_onnx(reshape([2, 8]), reshape([4, 4]))
    assert report.identical is False and not report
    assert report.base.ops == report.merged.ops == 2 and report.base.fingerprint != report.merged.fingerprint
    assert any("Constant" in d and "[4, 4]" in d for d in report.differences), str(report)
