"""Bad input gets a clear LoraFxError (what, where, how to fix) and leaves the user's model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import Rule


def model_state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m) for n, m in model.named_modules()},
            model.training)


def assert_unchanged(model, before):
    tensors, flags, modules, training = model_state(model)
    assert all(torch.equal(before[0][k], tensors[k]) for k in tensors)
    assert flags == before[1] and modules == before[2] and training == before[3]


def expect_error(cls, fn, *words):
    with pytest.raises(cls) as info:
        fn()
    message = str(info.value)
    assert isinstance(info.value, lora_fx.LoraFxError)
    assert "How to fix:" in message, message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


def test_not_a_module():
    expect_error(lora_fx.InputError, lambda: lora_fx.adapt(lambda x: x, example_inputs=(torch.ones(1),)),
                 "nn.Module", "function")


def test_example_inputs_that_do_not_fit(mlp):
    model, _ = mlp
    before = model_state(model)
    expect_error(lora_fx.InputError, lambda: lora_fx.adapt(model, example_inputs=(torch.ones(3, 5),)),
                 "do not fit", "TinyMLP", "(3, 5)")
    assert_unchanged(model, before)


def test_tracing_fails_in_every_front_end():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # branches on values: neither front end can

    model = DataDependent()
    before = model_state(model)
    msg = expect_error(lora_fx.TraceError, lambda: lora_fx.adapt(model, example_inputs=(torch.ones(2, 4),), r=2),
                       "torch.fx symbolic tracing", "torch.export", "DataDependent")
    assert "control flow" in msg  # the hint fits the cause
    assert_unchanged(model, before)


def test_no_site_matched_lists_the_candidates(block):
    model, args = block
    before = model_state(model)
    msg = expect_error(lora_fx.NoSitesError,
                       lambda: lora_fx.adapt(model, rules=[Rule(name="query")], example_inputs=args),
                       "no rule matched", "'q'", "'w_up'", "query")
    assert_unchanged(model, before)


def test_model_without_linear_sites():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    expect_error(lora_fx.NoSitesError, lambda: lora_fx.adapt(model, example_inputs=(torch.ones(2, 4),)),
                 "no linear-like site")


@pytest.mark.parametrize("kwargs, words", [
    ({"r": 0}, ["r must be a positive integer"]),
    ({"r": -2}, ["r must be a positive integer"]),
    ({"alpha": 0}, ["alpha must be a positive number"]),
    ({"alpha": -1.0}, ["alpha must be a positive number"]),
    ({"dropout": 1.0}, ["dropout must be in [0, 1)"]),
    ({"dropout": -0.1}, ["dropout must be in [0, 1)"]),
])
def test_bad_lora_settings(block, kwargs, words):
    model, args = block
    before = model_state(model)
    expect_error(lora_fx.RuleError, lambda: lora_fx.adapt(model, example_inputs=args, **kwargs), *words)
    expect_error(lora_fx.RuleError, lambda: Rule(name="q", **kwargs), *words)
    assert_unchanged(model, before)


def test_rank_larger_than_the_weight(block):
    model, args = block
    before = model_state(model)
    expect_error(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=[Rule(name="q", r=17)], example_inputs=args,
                                                          strict=True),
                 "r=17", "min(in, out)", "q (r=16)", "lower r")
    assert_unchanged(model, before)


def test_fold_on_a_module_that_was_not_adapted(mlp):
    model, _ = mlp
    expect_error(lora_fx.NotAdaptedError, lambda: lora_fx.fold(model), "not adapted", "TinyMLP")
    expect_error(lora_fx.InputError, lambda: lora_fx.fold("model.pt"), "str")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_fold_refuses_non_finite_lora_before_writing(block, value):
    model, args = block
    adapted = lora_fx.adapt(model, example_inputs=args)
    with torch.no_grad():
        adapted.lora_fx["w_down"].lora_B[0, 0] = value  # the last LoRA: earlier ones would fold fine
    before = model_state(model)
    for inplace in (False, True):
        expect_error(lora_fx.FoldError, lambda: lora_fx.fold(adapted, inplace=inplace), "NaN or Inf",
                     "lora_fx.w_down.lora_B", "nothing was folded")
    assert_unchanged(model, before)
    assert hasattr(adapted, "lora_fx")  # still adapted after the refused in-place fold


def test_malformed_rules(block):
    model, args = block
    expect_error(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules="q", example_inputs=args), "str")
    expect_error(lora_fx.RuleError, lambda: Rule(name="q(", r=4), "not a valid regex")
    expect_error(lora_fx.RuleError, lambda: Rule(op="conv2d"), "unknown op kind")


def test_unknown_frontend(block):
    model, args = block
    expect_error(lora_fx.InputError, lambda: lora_fx.adapt(model, example_inputs=args, frontend="jit"), "jit")


def test_a_rule_that_matches_nothing_warns_or_raises_under_strict(block):
    model, args = block
    rules = [Rule(name="q"), Rule(name="qq_proj")]
    with pytest.warns(UserWarning, match="rule 1 .* decides no site: .*nearest names"):
        lora_fx.adapt(model, rules=rules, example_inputs=args)
    before = model_state(model)
    expect_error(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=rules, example_inputs=args, strict=True),
                 "rules[1]", "qq_proj", "nearest names")
    assert_unchanged(model, before)
