"""The fold pass (passes/fold.py): B·A folded into W0 in fp32, every LoRA node removed, the original graph back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import Rule
from lora_fx.passes.infra import graph_signature
from lora_fx.passes.trace import trace
from tests.conftest import TinyBlock, randomize_lora

FRONTENDS = ["fx", "export"]

# Fold parity: the folded model computes W0·x + s·B·A·x as (W0 + s·B·A)·x, so results differ only by rounding.
# fp32: the sum is reassociated once per layer; errors stay near fp32 epsilon times the activation scale (~1e-6);
# we allow 1e-5. bf16: W0 + s·B·A is rounded once to bf16 (8 mantissa bits, relative step 2^-8 = 0.4%) while
# the unfolded model rounds W0·x and the LoRA term separately, so outputs of size ~1 may differ by a few bf16
# steps: we allow 5e-2 absolute (about 6 steps at 1.0).
FOLD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def state_snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_fold_gives_back_the_original_graph(block, frontend):
    model, args = block
    original = trace(model, args, frontend=frontend).graph_module
    adapted = lora_fx.adapt(model, example_inputs=args, frontend=frontend)
    graph = lora_fx.graph(adapted)
    assert graph_signature(graph.graph) != graph_signature(original.graph)
    randomize_lora(adapted)
    folded_graph = lora_fx.fold(graph)  # the graph-level fold: the graph as traced, node for node
    assert graph_signature(folded_graph.graph) == graph_signature(original.graph)
    assert all(n.op != "call_module" or not n.target.startswith("lora_fx") for n in folded_graph.graph.nodes)
    merged = lora_fx.fold(adapted)  # the model-level fold: the user's own class
    assert type(merged) is type(model) and not hasattr(merged, "lora_fx")
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_fold_parity(frontend, dtype):
    torch.manual_seed(0)
    model, x = TinyBlock().to(dtype), torch.randn(2, 5, 16, dtype=dtype)
    adapted = lora_fx.adapt(model, example_inputs=(x,), frontend=frontend)
    assert all(l.lora_A.dtype == torch.float32 for l in adapted.lora_fx.values())  # fp32 LoRA on a bf16 base
    randomize_lora(adapted)
    with torch.no_grad():
        unfolded, folded = adapted(x), lora_fx.fold(adapted)(x)
    assert folded.dtype == dtype
    assert (unfolded.float() - folded.float()).abs().max().item() <= FOLD_TOLERANCE[dtype]
    assert not torch.equal(unfolded, model(x))  # the LoRA really changed the output


def test_fold_rounds_once_in_fp32():
    """A bf16 weight gets W0 + delta computed in fp32 and rounded once (not delta rounded, then added in bf16)."""
    torch.manual_seed(0)
    model, x = TinyBlock().to(torch.bfloat16), torch.randn(2, 5, 16, dtype=torch.bfloat16)
    adapted = lora_fx.adapt(model, rules=[Rule(name="q")], example_inputs=(x,), frontend="fx")
    randomize_lora(adapted, scale=1e-3)
    lora = adapted.lora_fx["q"]
    expected = (model.q.weight.double() + lora.delta_weight(torch.float64)).to(torch.bfloat16)
    folded = dict(lora_fx.fold(adapted).named_parameters())["q.weight"]
    assert torch.equal(folded, expected)


def test_fold_default_keeps_adapted_and_model(block):
    model, args = block
    adapted = lora_fx.adapt(model, example_inputs=args)
    randomize_lora(adapted)
    before = state_snapshot(model)
    with torch.no_grad():
        out = adapted(*args)
    merged = lora_fx.fold(adapted)
    assert all(torch.equal(before[k], v) for k, v in state_snapshot(model).items())  # user's model unchanged
    with torch.no_grad():
        assert torch.equal(adapted(*args), out)  # adapted still adapted: training can go on
    params = dict(merged.named_parameters())
    assert params["q.weight"] is not model.q.weight  # folded weights are new tensors ...
    assert params["q.bias"] is model.q.bias and params["ln.weight"] is model.ln.weight  # ... the rest is shared
    second = lora_fx.fold(adapted)  # folding again from the adapted module gives the same weights
    assert all(torch.equal(params[k], v) for k, v in second.named_parameters())


def test_fold_inplace_writes_into_w0(block):
    model, args = block
    adapted = lora_fx.adapt(model, example_inputs=args)
    randomize_lora(adapted)
    with torch.no_grad():
        expected = lora_fx.fold(adapted)(*args)
    q_weight = model.q.weight
    merged = lora_fx.fold(adapted, inplace=True)
    assert merged is model and not hasattr(merged, "lora_fx")  # the user's own model, weights merged
    assert dict(merged.named_parameters())["q.weight"] is q_weight  # same tensor, new values
    with torch.no_grad():
        assert torch.allclose(model(*args), expected, atol=1e-6)
        assert torch.allclose(adapted(*args), expected, atol=1e-6)  # its adapter is off: not added twice
    with pytest.raises(lora_fx.NotAdaptedError):
        lora_fx.fold(merged)  # nothing left to fold


@pytest.mark.parametrize("layout, rows", [("out_in", ()), ("in_out", ()), ("out_in", ((2, 5), (7, 9)))])
def test_add_delta_in_place_equals_delta_weight(layout, rows):
    """fold adds each LoRA with one in-place GEMM (add_delta_); it must add exactly delta_weight's values, for
    either weight layout and for a LoRA on row slices. fp64, so the two orders of rounding agree to 1e-12."""
    from lora_fx.lora import LoraLinear
    from lora_fx.site import IN_OUT, OUT_IN

    torch.manual_seed(0)
    lora = LoraLinear(6, 10, r=3, alpha=5.0, weight_layout=IN_OUT if layout == "in_out" else OUT_IN, rows=rows)
    nn.init.normal_(lora.lora_B)
    base = torch.randn(10, 6, dtype=torch.float64)
    base = base.T.contiguous() if layout == "in_out" else base
    expected = base + lora.delta_weight(torch.float64)
    got = lora.add_delta_(base.clone(), alpha=1.0)
    assert (got - expected).abs().max().item() <= 1e-12
    assert (lora.add_delta_(got, alpha=-1.0) - base).abs().max().item() <= 1e-12  # subtracting takes it out again


class SquareInOut(nn.Module):
    """Square weights stored (in, out): a fold that forgot to transpose B·A would still fit the shape."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / 4)  # x @ w
        self.c_w, self.c_b = nn.Parameter(torch.randn(d, d) / 4), nn.Parameter(torch.randn(d))  # GPT-2 Conv1D's addmm

    def forward(self, x):
        return torch.addmm(self.c_b, torch.relu(x @ self.w), self.c_w)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_fold_of_square_in_out_weights(frontend, inplace):
    torch.manual_seed(0)
    model, x = SquareInOut(), torch.randn(4, 16)
    adapted = lora_fx.adapt(model, example_inputs=(x,), frontend=frontend, r=4, alpha=8)
    assert {l.weight_layout for l in adapted.lora_fx.values()} == {"in_out"} and len(adapted.lora_fx) == 2
    randomize_lora(adapted, 0.3)
    with torch.no_grad():
        expected, base = adapted(x), model(x)
        folded = lora_fx.fold(adapted, inplace=inplace)(x)
    assert (expected - base).abs().max() > 0.5  # the LoRA moves the output
    assert (folded - expected).abs().max().item() <= 1e-5


def test_merge_of_square_in_out_weights():
    torch.manual_seed(0)
    model, x = SquareInOut(), torch.randn(4, 16)
    adapted = lora_fx.adapt(model, example_inputs=(x,), frontend="fx", r=4, alpha=8)
    randomize_lora(adapted, 0.3)
    with torch.no_grad():
        expected = adapted(x)
        lora_fx.merge_adapter(adapted)
        assert (adapted(x) - expected).abs().max().item() <= 1e-5


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_the_folded_model_is_in_the_adapted_models_modes(inplace):
    """adapted.eval() switches the adapted model's modules, which are not the user's model's own: the folded model
    takes the adapted model's modes (dropout off here), and unless inplace the user's model keeps its own."""
    torch.manual_seed(0)
    model = WithDropout()  # in training mode, as a fresh model is
    x = torch.randn(8, 16)
    adapted = lora_fx.adapt(model, Rule(name=r"block\..*", r=4), example_inputs=(x,))
    randomize_lora(adapted)
    adapted.eval()
    expected = adapted(x)
    modes_before = [m.training for m in model.modules()]
    merged = lora_fx.fold(adapted, inplace=inplace)
    assert not any(m.training for m in merged.modules())
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    if inplace:  # the user's model is the folded model
        assert merged is model
    else:
        assert [m.training for m in model.modules()] == modes_before and any(modes_before)
    adapted.train()
    assert all(m.training for m in lora_fx.fold(adapted).modules())
