"""The inject pass (passes/inject.py): the adapted model equals the original at init, only LoRA trains, nothing else
changes, dropout and autocast behave."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import Rule
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
