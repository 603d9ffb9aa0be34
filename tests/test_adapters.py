"""Packed weights (LoRA on slices), several named adapters, and exact in-place switching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import Rule
from tests.conftest import TinyBlock, randomize_lora


class FusedQKV(nn.Module):
    """Attention with one packed qkv projection, as GPT-2's c_attn and nn.MultiheadAttention have."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.out(a.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_lora_on_the_q_and_v_slices_of_a_packed_weight(frontend):
    torch.manual_seed(0)
    model, x = FusedQKV(), torch.randn(2, 5, 16)
    adapted = lora_fx.adapt(model, rules=[Rule(role=["attn.q", "attn.v"], r=4)], example_inputs=(x,),
                            frontend=frontend)
    assert sorted(adapted.lora_fx) == ["qkv_q", "qkv_v"]
    assert adapted.lora_fx["qkv_q"].rows == ((0, 16),) and adapted.lora_fx["qkv_v"].rows == ((32, 48),)
    assert adapted.lora_fx["qkv_q"].lora_B.shape == (16, 4)  # one B row per row of the slice
    assert torch.equal(adapted(x), model(x))
    randomize_lora(adapted, scale=0.5)
    merged = lora_fx.fold(adapted)
    with torch.no_grad():
        assert torch.allclose(merged(x), adapted(x), atol=1e-5)
    changed = (dict(merged.named_parameters())["qkv.weight"] != model.qkv.weight).any(dim=1)
    assert changed[:16].all() and not changed[16:32].any() and changed[32:].all()  # k rows untouched


def two_adapters(block):
    model, args = block
    adapted = lora_fx.adapt(model, rules=[Rule(name="q|v", r=4)], example_inputs=args)
    lora_fx.add_adapter(adapted, "mlp", rules=[Rule(name="w_up|w_down", r=2)])
    randomize_lora(adapted, seed=1)
    with torch.no_grad():
        for lora in adapted.lora_fx_mlp.values():
            lora.lora_B.normal_(0, 0.1)
    return model, args, adapted


def test_named_adapters_add_select_disable(block):
    model, args, adapted = two_adapters(block)
    assert lora_fx.active_adapters(adapted) == ["default", "mlp"]
    with torch.no_grad():
        both = adapted(*args)
        lora_fx.set_adapter(adapted, "default")
        only_default = adapted(*args)
        lora_fx.set_adapter(adapted, "mlp")
        only_mlp = adapted(*args)
        with lora_fx.disable_adapters(adapted):
            assert torch.equal(adapted(*args), model(*args))
        assert lora_fx.active_adapters(adapted) == ["mlp"]
    assert not torch.allclose(only_default, only_mlp) and not torch.allclose(both, only_default)
    assert len(list(lora_fx.lora_parameters(adapted))) == 4  # the active adapter's A and B (2 weights)
    assert len(list(lora_fx.lora_parameters(adapted, "default"))) == 4
    with pytest.raises(lora_fx.InputError, match="no adapter named"):
        lora_fx.set_adapter(adapted, "nope")


@pytest.mark.parametrize("which", ["default", "mlp"])
def test_fold_any_one_adapter(block, which):
    model, args, adapted = two_adapters(block)
    lora_fx.set_adapter(adapted, which)
    with torch.no_grad():
        expected = adapted(*args)
    lora_fx.set_adapter(adapted, ["default", "mlp"])
    merged = lora_fx.fold(adapted, adapters=which)
    with torch.no_grad():
        assert torch.allclose(merged(*args), expected, atol=1e-5)
    assert not any(n.startswith("lora_fx") for n, _ in merged.named_modules())


def test_switching_adapters_in_place_restores_base_weights_bit_for_bit(block):
    model, args, adapted = two_adapters(block)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    lora_fx.set_adapter(adapted, "default")
    with torch.no_grad():
        expected = adapted(*args)
    lora_fx.merge_adapter(adapted, "default")  # W0 += delta in place, branches off
    assert not torch.equal(model.q.weight, originals["q.weight"])
    with torch.no_grad():
        assert torch.allclose(adapted(*args), expected, atol=1e-5)
    with pytest.raises(lora_fx.FoldError, match="merged already"):
        lora_fx.merge_adapter(adapted, "mlp")
    lora_fx.unmerge_adapter(adapted)
    lora_fx.set_adapter(adapted, "mlp")
    lora_fx.merge_adapter(adapted, "mlp")
    lora_fx.unmerge_adapter(adapted)
    assert all(torch.equal(originals[k], v) for k, v in model.state_dict().items())  # bit-identical
    with pytest.raises(lora_fx.FoldError, match="no adapter is merged"):
        lora_fx.unmerge_adapter(adapted)


def test_unmerge_by_subtraction_is_close_but_warns():
    torch.manual_seed(0)
    model, x = TinyBlock().to(torch.bfloat16), torch.randn(2, 5, 16, dtype=torch.bfloat16)
    adapted = lora_fx.adapt(model, rules=[Rule(name="q")], example_inputs=(x,))
    randomize_lora(adapted)
    original = model.q.weight.detach().clone()
    lora_fx.merge_adapter(adapted, keep_original=False)
    with pytest.warns(UserWarning, match="not bit for bit"):
        lora_fx.unmerge_adapter(adapted)
    assert (model.q.weight.float() - original.float()).abs().max() < 2e-2  # bf16 rounding, twice


# Fold error against an fp64 reference, per dtype: one final rounding means |folded - exact| <= half an ulp of the
# result, i.e. eps/2 * |value| (eps = 2^-23 fp32, 2^-10 fp16, 2^-7 bf16).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fold_error_is_one_final_rounding(dtype):
    torch.manual_seed(0)
    model, x = TinyBlock().to(dtype), torch.randn(2, 5, 16, dtype=dtype)
    adapted = lora_fx.adapt(model, example_inputs=(x,), frontend="fx")
    randomize_lora(adapted, scale=0.05)
    folded = dict(lora_fx.fold(adapted).named_parameters())
    eps = torch.finfo(dtype).eps
    for lora in adapted.lora_fx.values():
        exact = dict(model.named_parameters())[lora.weight_name].double() + lora.delta_weight(torch.float64)
        err = (folded[lora.weight_name].double() - exact).abs()
        assert (err <= eps / 2 * exact.abs() + 1e-30).all(), lora.weight_name


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_an_added_adapter_takes_the_models_mode(block, mode):
    """New modules start in training mode: an adapter added to an eval-mode model must not drop out."""
    model, args = block
    adapted = lora_fx.adapt(model, rules=[Rule(name="q", r=4)], example_inputs=args)
    getattr(adapted, mode)()
    lora_fx.add_adapter(adapted, "second", rules=[Rule(name="v", r=2)], dropout=0.5)
    training = [m.training for m in adapted.lora_fx_second.modules()]
    assert training and set(training) == {mode == "train"}
    if mode == "eval":
        randomize_lora(adapted, seed=2)
        with torch.no_grad():
            for lora in adapted.lora_fx_second.values():
                lora.lora_B.normal_(0, 0.5)
            assert torch.equal(adapted(*args), adapted(*args))  # no dropout in eval
