"""Bad inputs, adapters in memory: calls on adapted models that cannot be honoured: fold twice, merge states, non-finite weights, adapter names.

What each case checks: tests/bad_inputs.py.
"""

from __future__ import annotations


import pytest
import torch

import lora_fx

from bad_inputs import state, assert_unchanged, expect


def test_fold_twice(adapted):
    folded = lora_fx.fold(adapted)
    before = state(folded)
    expect(lora_fx.NotAdaptedError, lambda: lora_fx.fold(folded), "not adapted", "TinyMLP")
    assert_unchanged(folded, before)


def test_fold_not_a_module():
    expect(lora_fx.InputError, lambda: lora_fx.fold("model.pt"), "str", "lora_fx.adapt")


def test_unmerge_without_merge(adapted, eval_mlp):
    model, _ = eval_mlp
    before, before_model = state(adapted), state(model)
    expect(lora_fx.FoldError, lambda: lora_fx.unmerge_adapter(adapted), "no adapter is merged", "merge_adapter")
    assert_unchanged(adapted, before)
    assert_unchanged(model, before_model)


def test_merge_twice_and_fold_while_merged(adapted):
    lora_fx.merge_adapter(adapted)
    before = state(adapted)
    expect(lora_fx.FoldError, lambda: lora_fx.merge_adapter(adapted), "merged already", "unmerge_adapter")
    expect(lora_fx.FoldError, lambda: lora_fx.fold(adapted), "merged in place", "unmerge_adapter")
    assert_unchanged(adapted, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("call", ["fold", "fold_inplace", "merge"])
def test_non_finite_lora_weights(adapted, eval_mlp, value, call):
    model, _ = eval_mlp
    with torch.no_grad():
        adapted.lora_fx["fc2"].lora_B[0, 0] = value  # the last LoRA: earlier ones would fold fine
    before, before_model = state(adapted), state(model)
    fn = {"fold": lambda: lora_fx.fold(adapted), "fold_inplace": lambda: lora_fx.fold(adapted, inplace=True),
          "merge": lambda: lora_fx.merge_adapter(adapted)}[call]
    expect(lora_fx.FoldError, fn, "NaN or Inf", "fc2", "nothing was folded")
    assert_unchanged(adapted, before)
    assert_unchanged(model, before_model)


def test_set_adapter_unknown_name(adapted):
    active = lora_fx.active_adapters(adapted)
    expect(lora_fx.InputError, lambda: lora_fx.set_adapter(adapted, "nope"), "nope", "default")
    assert lora_fx.active_adapters(adapted) == active


@pytest.mark.parametrize("name", ["default", "second", "a.b"])
def test_add_adapter_with_a_taken_or_bad_name(adapted, name):
    lora_fx.add_adapter(adapted, "second", r=2)
    before = state(adapted)
    expect(lora_fx.RuleError, lambda: lora_fx.add_adapter(adapted, name, r=2), repr(name), "taken")
    assert_unchanged(adapted, before)


def test_add_adapter_name_not_a_string(adapted):
    before = state(adapted)
    expect(lora_fx.RuleError, lambda: lora_fx.add_adapter(adapted, 3, r=2), "adapter name")
    assert_unchanged(adapted, before)


def test_unknown_adapter_to_fold_or_merge(adapted):
    before = state(adapted)
    expect(lora_fx.InputError, lambda: lora_fx.fold(adapted, adapters="zz"), "zz")
    expect(lora_fx.FoldError, lambda: lora_fx.merge_adapter(adapted, "zz"), "zz")
    assert_unchanged(adapted, before)


def test_lora_calls_on_a_plain_model(eval_mlp):
    model, _ = eval_mlp
    before = state(model)
    expect(lora_fx.NotAdaptedError, lambda: list(lora_fx.lora_parameters(model)), "not adapted", "TinyMLP")
    expect(lora_fx.NotAdaptedError, lambda: lora_fx.lora_state_dict(model), "not adapted")
    expect(lora_fx.NotAdaptedError, lambda: lora_fx.fold(model), "not adapted")
    assert_unchanged(model, before)


