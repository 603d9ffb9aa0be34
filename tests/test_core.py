"""The core pipeline on small models: adapt -> train -> fold gives back the original graph, both front ends."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import Rule
from lora_fx.passes.infra import graph_signature
from lora_fx.passes.trace import trace
from tests.conftest import TinyBlock, randomize_lora, state_of, train_steps

FRONTENDS = ["fx", "export"]


def state_snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_adapted_output_equals_original_at_init(block, frontend):
    model, args = block
    adapted = lora_fx.adapt(model, example_inputs=args, frontend=frontend)
    assert state_of(adapted).frontend == frontend
    assert torch.equal(adapted(*args), model(*args))  # exactly: B starts at zero


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_every_kind_of_site_is_found(block, frontend):
    model, args = block
    plan = lora_fx.plan(model, example_inputs=args, frontend=frontend)
    ops = {d.site.weight: d.site.op for d in plan.decisions}
    assert ops == {"q.weight": "linear_module", "k.weight": "linear_module", "v.weight": "linear_module",
                   "o.weight": "linear_module", "w_up": "matmul", "w_down": "functional_linear"}
    layouts = {d.site.weight: (d.site.weight_layout, d.site.in_features, d.site.out_features) for d in plan.decisions}
    assert layouts["w_up"] == ("in_out", 16, 32) and layouts["w_down"] == ("out_in", 32, 16)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_only_lora_trains_and_loss_falls(block, frontend):
    model, args = block
    before = state_snapshot(model)
    adapted = lora_fx.adapt(model, example_inputs=args, frontend=frontend)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in adapted.named_parameters() if n.startswith("lora_fx.")}
    assert len(trainable) == 12  # A and B for 6 weights
    losses = train_steps(adapted, args, steps=15)
    assert losses[-1] < 0.7 * losses[0]
    grads = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert grads == trainable
    after = state_snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # W0 never moves


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_adapt_shares_weights_and_changes_nothing_else(block, frontend):
    model, args = block
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    adapted = lora_fx.adapt(model, example_inputs=args, frontend=frontend)
    params = dict(adapted.named_parameters())
    assert params["q.weight"] is model.q.weight and params["w_up"] is model.w_up  # no copies
    assert all(not p.requires_grad for p in model.parameters())  # the base is frozen
    assert all(flags.values())  # (they were trainable before)
    assert dict(model.named_modules()) == modules  # nothing added to or removed from the user's model
    assert not hasattr(model, "lora_fx")


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


# Fold parity: the folded model computes W0·x + s·B·A·x as (W0 + s·B·A)·x, so results differ only by rounding.
# fp32: the sum is reassociated once per layer; errors stay near fp32 epsilon times the activation scale (~1e-6);
# we allow 1e-5. bf16: W0 + s·B·A is rounded once to bf16 (8 mantissa bits, relative step 2^-8 = 0.4%) while
# the unfolded model rounds W0·x and the LoRA term separately, so outputs of size ~1 may differ by a few bf16
# steps: we allow 5e-2 absolute (about 6 steps at 1.0).
FOLD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


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


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_lora_dropout_follows_train_and_eval(block, frontend):
    model, args = block
    adapted = lora_fx.adapt(model, rules=[Rule(name="q")], example_inputs=args, frontend=frontend, dropout=0.5)
    randomize_lora(adapted, scale=1.0)
    adapted.train()
    with torch.no_grad():
        a, b = adapted(*args), adapted(*args)
    assert not torch.equal(a, b)  # dropout active in the LoRA branch
    adapted.eval()
    with torch.no_grad():
        assert torch.equal(adapted(*args), adapted(*args))


def test_export_frontend_takes_other_batch_and_sequence_sizes(block):
    model, args = block
    adapted = lora_fx.adapt(model, example_inputs=args, frontend="export")
    randomize_lora(adapted)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        assert torch.allclose(adapted(x), lora_fx.fold(adapted)(x), atol=1e-5)


def test_auto_frontend_falls_back_to_export_for_control_flow():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[0] > 1:  # symbolic tracing cannot follow this; torch.export can
                return self.fc(x)
            return self.fc(-x)

    model, x = Branchy(), torch.ones(2, 4)
    adapted = lora_fx.adapt(model, example_inputs=(x,), r=2)
    assert state_of(adapted).frontend == "export"
    assert torch.equal(adapted(x), model(x))


def test_transformers_model_through_torch_export():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    adapted = lora_fx.adapt(model, rules=[Rule(name="q_proj|v_proj", r=4)], example_inputs=(ids,))
    assert state_of(adapted).frontend == "export"
    assert sorted(adapted.lora_fx) == [f"model_layers_{i}_self_attn_{p}_proj" for i in range(2) for p in "qv"]
    assert torch.equal(adapted(ids)[0] if isinstance(adapted(ids), tuple) else adapted(ids).logits,
                       model(ids).logits)
    losses = []
    opt = torch.optim.AdamW(lora_fx.lora_parameters(adapted), lr=1e-2)
    for _ in range(8):
        logits = adapted(ids)
        logits = logits[0] if isinstance(logits, tuple) else logits.logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merged = lora_fx.fold(adapted)
    out = lambda m: (lambda o: o[0] if isinstance(o, tuple) else o.logits)(m(ids))
    with torch.no_grad():
        assert torch.allclose(out(merged), out(adapted), atol=1e-4)


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


# ------------------------------------------------------------------------------------------------ paths bugs hide in
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


def test_lora_under_bf16_autocast_matches_fp32():
    """Every GPU run takes LoraLinear.forward's autocast path: it must compute what the fp32 path computes (to
    bf16 precision), the scaling applied once. alpha/r = 2, so a scale applied twice doubles the LoRA term."""
    torch.manual_seed(0)
    model, x = TinyBlock(), torch.randn(2, 5, 16)
    adapted = lora_fx.adapt(model, example_inputs=(x,), frontend="fx", r=4, alpha=8)
    randomize_lora(adapted, 0.3)
    with torch.no_grad():
        fp32, base = adapted(x), model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = adapted(x)
            branch = adapted.lora_fx["q"](x)
        branch_fp32 = adapted.lora_fx["q"](x)
    assert (fp32 - base).abs().max() > 1.0  # a LoRA term well above bf16's error
    assert (mixed.float() - fp32).abs().max().item() <= 0.1
    assert branch.dtype == torch.bfloat16
    assert (branch.float() - branch_fp32).abs().max().item() <= 2e-2 * branch_fp32.abs().max().item()


def test_lora_dropout_drops_the_input_features():
    """Dropout acts on the branch's input x, before A (the paper's dropout(x)·Aᵀ·Bᵀ), with the usual 1/(1-p)."""
    from lora_fx.lora import LoraLinear

    torch.manual_seed(0)
    lora = LoraLinear(8, 6, r=2, alpha=4, dropout=0.5).train()
    nn.init.normal_(lora.lora_B)
    x = torch.randn(5, 8)
    torch.manual_seed(3)
    got = lora(x)
    torch.manual_seed(3)
    expected = torch.nn.functional.linear(torch.nn.functional.linear(torch.nn.functional.dropout(x, 0.5, True),
                                                                      lora.lora_A), lora.lora_B) * lora.scaling
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, lora.eval()(x))  # the mask did something
