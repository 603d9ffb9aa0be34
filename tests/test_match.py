"""The match pass (passes/match.py) and the choices made on its sites: every kind of site found, one LoRA per weight,
rules with their own settings, tied weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import Rule
from tests.conftest import randomize_lora, state_of

FRONTENDS = ["fx", "export"]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_every_kind_of_site_is_found(block, frontend):
    model, args = block
    plan = lora_fx.plan(model, example_inputs=args, frontend=frontend)
    ops = {d.site.weight: d.site.op for d in plan.decisions}
    assert ops == {"q.weight": "linear_module", "k.weight": "linear_module", "v.weight": "linear_module",
                   "o.weight": "linear_module", "w_up": "matmul", "w_down": "functional_linear"}
    layouts = {d.site.weight: (d.site.weight_layout, d.site.in_features, d.site.out_features) for d in plan.decisions}
    assert layouts["w_up"] == ("in_out", 16, 32) and layouts["w_down"] == ("out_in", 32, 16)


class TransposedWeights(nn.Module):
    """x @ W.T on (out, in) weights, written each way a model does it (Falcon's FalconLinear: input @ self.weight.T)."""

    def __init__(self):
        super().__init__()
        self.ws = nn.ParameterList(nn.Parameter(torch.randn(8, 8) / 3) for _ in range(6))
        self.head = nn.Parameter(torch.randn(4, 8) / 3)  # (out=4, in=8): the layout tells out from in

    def forward(self, x):
        w = self.ws
        x = x @ w[0].T
        x = x @ w[1].t()
        x = torch.matmul(x, w[2].transpose(0, 1))
        x = x.matmul(w[3].mT)
        x = x @ w[4].permute(1, 0)
        x = torch.mm(x, w[5].transpose(-1, -2))
        return x @ self.head.T


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_matmul_on_a_transposed_weight_is_a_site_with_the_weight_as_it_is_stored(frontend):
    """x @ W.T in any spelling is a matmul site of the (out, in) weight W: the LoRA's delta is added to W as stored,
    and the folded model equals the adapted one."""
    torch.manual_seed(0)
    model, args = TransposedWeights(), (torch.randn(3, 8),)
    plan = lora_fx.plan(model, example_inputs=args, frontend=frontend)
    sites = {d.site.weight: d.site for d in plan.decisions}
    assert set(sites) == {f"ws.{i}" for i in range(6)} | {"head"}
    assert all(s.op == "matmul" and s.weight_layout == "out_in" and not s.other_readers for s in sites.values())
    assert (sites["head"].in_features, sites["head"].out_features) == (8, 4)
    adapted = lora_fx.adapt(model, example_inputs=args, frontend=frontend, r=2)
    randomize_lora(adapted)
    with torch.no_grad():
        merged = lora_fx.fold(adapted)
        torch.testing.assert_close(merged(*args), adapted(*args), atol=1e-5, rtol=1e-5)
        lora = adapted.lora_fx["head"]
        torch.testing.assert_close(merged.head - model.head, lora.scaling * lora.lora_B @ lora.lora_A)


class ShapeReads(nn.Module):
    """Weights whose shape or dtype the forward reads (HF's Conv1D-style reshapes): not another use of their values."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6) / 3)  # (in, out), read by x @ w
        self.proj = nn.Linear(6, 4)

    def forward(self, x):
        h = (x @ self.w).view(-1, self.w.size(-1)).to(self.w.dtype)
        return self.proj(h) / self.proj.weight.shape[0]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_reads_of_a_weights_shape_or_dtype_are_not_other_readers(frontend):
    """W.size(-1), W.shape, W.dtype do not read the values a fold changes: the weight is still adapted."""
    torch.manual_seed(0)
    model, args = ShapeReads(), (torch.randn(3, 8),)
    plan = lora_fx.plan(model, example_inputs=args, frontend=frontend)
    sites = {d.site.weight: d.site for d in plan.decisions}
    assert not sites["w"].other_readers and plan.decisions[0].adapted
    adapted = lora_fx.adapt(model, lora_fx.Rule(name="w", r=2), example_inputs=args, frontend=frontend)
    randomize_lora(adapted)
    with torch.no_grad():
        torch.testing.assert_close(lora_fx.fold(adapted)(*args), adapted(*args), atol=1e-5, rtol=1e-5)


class SharedWeight(nn.Module):
    """One weight used at two call sites (as DeBERTa-v2 reuses its projections)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, y):
        return self.proj(x) * self.proj(y)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_one_weight_at_several_sites_gets_one_lora(frontend):
    torch.manual_seed(0)
    model, args = SharedWeight(), (torch.randn(3, 8), torch.randn(3, 8))
    adapted = lora_fx.adapt(model, example_inputs=args, frontend=frontend)
    assert len(state_of(adapted).sites) == 2 and list(adapted.lora_fx) == ["proj"]
    assert sum(1 for n in lora_fx.graph(adapted).graph.nodes if n.meta.get("lora_fx", ("",))[0] == "branch") == 2
    randomize_lora(adapted)
    with torch.no_grad():
        assert torch.allclose(lora_fx.fold(adapted)(*args), adapted(*args), atol=1e-5)


def test_rules_choose_sites_with_their_own_settings(block):
    model, args = block
    adapted = lora_fx.adapt(model, rules=[Rule(name="q|v", r=4, alpha=8), Rule(name="w_.*", r=2, dropout=0.1)],
                            example_inputs=args)
    loras = adapted.lora_fx
    assert set(loras) == {"q", "v", "w_up", "w_down"}
    assert (loras["q"].r, loras["q"].scaling) == (4, 2.0)
    assert (loras["w_up"].r, loras["w_up"].scaling) == (2, 8.0)  # alpha from the defaults (16)
    assert isinstance(loras["w_up"].dropout, nn.Dropout) and loras["w_up"].dropout.p == 0.1


class TiedHead(nn.Module):
    """An embedding and an output head sharing one tensor, as most language models do."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_tied_weights_are_refused_or_skipped(frontend):
    model, ids = TiedHead(), torch.randint(0, 10, (2, 5))
    with pytest.warns(UserWarning, match="tied"):
        adapted = lora_fx.adapt(model, example_inputs=(ids,), frontend=frontend, r=4)
    assert list(adapted.lora_fx) == ["fc"]  # rules=None skips the tied head
    with pytest.raises(lora_fx.RuleError, match="tied to") as info:
        lora_fx.adapt(model, rules=[Rule(name="head")], example_inputs=(ids,), frontend=frontend, r=4)
    assert "untie=True" in str(info.value)


@pytest.mark.parametrize("inplace", [False, True])
def test_untie_gives_the_head_its_own_folded_weight(inplace):
    model, ids = TiedHead(), torch.randint(0, 10, (2, 5))
    emb_before = model.emb.weight.detach().clone()
    adapted = lora_fx.adapt(model, rules=[Rule(name="head")], example_inputs=(ids,), frontend="fx", r=4, untie=True)
    randomize_lora(adapted)
    with torch.no_grad():
        expected = adapted(ids)
        merged = lora_fx.fold(adapted, inplace=inplace)
        assert torch.allclose(merged(ids), expected, atol=1e-5)
    assert torch.equal(model.emb.weight, emb_before)  # the embedding did not move
    assert not torch.equal(dict(merged.named_parameters())["head.weight"], emb_before)
