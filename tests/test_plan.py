"""Planning semantics: small layers under the default call, and packed weights decided slice by slice.

Packed weights are tested on the four layouts users meet: GPT-2's Conv1D c_attn, nn.MultiheadAttention's
in_proj_weight, nn.TransformerDecoder (self-attention packed, cross-attention split into q and k|v rows before
F.linear) and timm's ViT qkv Linear. The LoRA parameter counts are computed from the configs, not read back.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lora_fx
from lora_fx import Rule

import zoo as Z

TWO_RULES = [Rule(role="attn.q", r=4, alpha=8), Rule(role="attn.v", r=2, alpha=4)]
E = Z.HIDDEN


def lora_count(adapted) -> int:
    return sum(p.numel() for p in lora_fx.lora_parameters(adapted))


def loras(adapted) -> list:
    return list(adapted.lora_fx.values())


# ------------------------------------------------------------------------------------------------ small layers
def test_default_call_caps_r_at_a_narrow_layer_and_plan_says_so():
    model, args, _ = Z.narrow_head()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rules=None caps silently; the plan is where it shows
        adapted = lora_fx.adapt(model, example_inputs=args, r=8)
        plan = lora_fx.plan(model, example_inputs=args, r=8)
    head = next(l for l in loras(adapted) if l.weight_name == "head.weight")
    assert (head.r, tuple(head.lora_A.shape), tuple(head.lora_B.shape)) == (2, (2, E), (2, 2))
    row = next(r for r in plan.rows() if r["site"] == "head")
    assert (row["r"], row["requested_r"]) == (2, 8) and "capped 8 -> 2" in row["why"]
    assert "2 (capped from 8)" in plan.table()
    assert plan.parameters_added() == lora_count(adapted) == 8 * (E + E) + 2 * (E + 2)


def test_a_rule_whose_r_is_too_large_is_capped_with_a_warning_and_plan_reports_the_r_used():
    model, args, _ = Z.narrow_head()
    rules = [Rule(name="body|head", r=16)]
    with pytest.warns(UserWarning, match=r"asks for r=16, more than min\(in, out\) of \['head \(r=2\)'\]"):
        adapted = lora_fx.adapt(model, rules, example_inputs=args)
    plan = lora_fx.plan(model, rules, example_inputs=args)
    planned = {r["weight"]: r["r"] for r in plan.rows()}
    assert planned == {l.weight_name: l.r for l in loras(adapted)} == {"body.weight": 16, "head.weight": 2}


def test_adapter_files_keep_their_r_even_above_min_in_out(tmp_path):
    """A file's tensors fix r: a LoRA of r=4 on a 2-output head (PEFT allows it) loads as r=4."""
    model, args, _ = Z.narrow_head()
    adapted = lora_fx.adapt(model, [Rule(name="head", r=2)], example_inputs=args)
    lora_fx.save_adapter(adapted, tmp_path / "a")
    again = lora_fx.adapt_from_adapter(copy.deepcopy(model), tmp_path / "a", example_inputs=args)
    assert [l.r for l in loras(again)] == [2]


# ------------------------------------------------------------------------------------------------ packed weights
def _timm_vit():
    return Z.timm_vit()


PACKED = {  # name -> (builder, attention blocks with a packed or split q/k/v)
    "gpt2": (lambda: Z.gpt2(), Z.LAYERS),
    "mha": (Z.mha, 1),
    "transformer_decoder": (Z.transformer_decoder, 2 * Z.LAYERS),  # self- and cross-attention in each layer
    "timm_vit": (_timm_vit, Z.LAYERS),
}


@pytest.fixture(params=sorted(PACKED))
def packed(request):
    build, blocks = PACKED[request.param]
    model, args, kwargs = build()
    return request.param, model, args, kwargs, blocks


def _adapt(model, args, kwargs, rules=TWO_RULES, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no rule may "decide no site"
        return lora_fx.adapt(model, rules, example_inputs=args, example_kwargs=kwargs, **options)


def test_two_role_rules_each_adapt_their_slice(packed):
    name, model, args, kwargs, blocks = packed
    adapted = _adapt(model, args, kwargs)
    # q rows: r=4 over (in=E, rows=E); v rows: r=2 over (E, E), in every attention block
    assert lora_count(adapted) == blocks * (4 * (E + E) + 2 * (E + E)), name
    by_r = sorted(l.r for l in loras(adapted))
    assert by_r == [2] * blocks + [4] * blocks
    plan = lora_fx.plan(model, TWO_RULES, example_inputs=args, example_kwargs=kwargs)
    taken = {(r["weight"], tuple(r["slices"]) or tuple(r["roles"])): r["rule"] for r in plan.rows() if r["adapted"]}
    assert sorted(taken.values()) == [0] * blocks + [1] * blocks
    assert all(rule == (0 if "attn.q" in roles else 1) for (_, roles), rule in taken.items())


def test_gradients_reach_every_slice_and_fold_touches_only_their_rows(packed):
    name, model, args, kwargs, _ = packed
    adapted = _adapt(model, args, kwargs)
    torch.manual_seed(0)
    with torch.no_grad():
        for l in loras(adapted):
            l.lora_B.normal_(0, 0.1)
    adapted.train()
    out = Z.first_output(adapted(*args, **kwargs))
    out.float().pow(2).mean().backward()
    for l in loras(adapted):
        assert l.lora_A.grad is not None and l.lora_A.grad.abs().sum() > 0, (name, l)
        assert l.lora_B.grad is not None and l.lora_B.grad.abs().sum() > 0, (name, l)

    adapted.eval()
    merged = lora_fx.fold(adapted)
    with torch.no_grad():
        y, y_merged = Z.first_output(adapted(*args, **kwargs)), Z.first_output(merged(*args, **kwargs))
    err, scale = Z.max_err(y_merged, y)
    assert err <= 1e-5 * scale, (name, err)
    for l in loras(adapted):
        w0, w = model.get_parameter(l.weight_name), merged.get_parameter(l.weight_name)
        if l.weight_layout == "in_out":  # GPT-2's Conv1D stores (in, out): its rows are columns
            w0, w = w0.T, w.T
        rows = [i for a, b in (l.rows or ((0, w0.shape[0]),)) for i in range(a, b)]
        changed = (w - w0).abs().sum(dim=1).nonzero().flatten().tolist()
        written = set().union(*({i for a, b in (m.rows or ((0, w0.shape[0]),)) for i in range(a, b)}
                                for m in loras(adapted) if m.weight_name == l.weight_name))
        assert set(rows) <= set(changed) and set(changed) <= written, (name, l.weight_name)


def test_slices_from_different_rules_round_trip_through_adapter_files(packed, tmp_path):
    name, model, args, kwargs, _ = packed
    adapted = _adapt(model, args, kwargs)
    torch.manual_seed(1)
    with torch.no_grad():
        for l in loras(adapted):
            l.lora_B.normal_(0, 0.1)
    lora_fx.save_adapter(adapted, tmp_path / "a")
    again = lora_fx.adapt_from_adapter(copy.deepcopy(model), tmp_path / "a", example_inputs=args,
                                       example_kwargs=kwargs)
    assert sorted((l.weight_name, l.rows, l.r, l.scaling) for l in loras(again)) == \
        sorted((l.weight_name, l.rows, l.r, l.scaling) for l in loras(adapted))
    adapted.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(Z.first_output(again(*args, **kwargs)), Z.first_output(adapted(*args, **kwargs)))


def test_slices_from_different_rules_save_as_a_peft_adapter_that_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    model, args, kwargs = Z.gpt2()
    pristine = copy.deepcopy(model)
    adapted = _adapt(model, args, kwargs)
    torch.manual_seed(2)
    with torch.no_grad():
        for l in loras(adapted):
            l.lora_B.normal_(0, 0.5)
    lora_fx.save_peft_adapter(adapted, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(pristine, tmp_path / "peft").eval()
    adapted.eval()
    with torch.no_grad():
        want = Z.first_output(adapted(*args, **kwargs))
        got = peft_model(*args, **kwargs).logits
        base = Z.first_output(model(*args, **kwargs))
    assert (want - base).abs().max() > 0.1  # the adapter matters
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
