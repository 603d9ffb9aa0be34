"""Bad inputs, wrong types: arguments of the wrong type or value, refused before anything runs.

What each case checks: tests/bad_inputs.py.
"""

from __future__ import annotations


import pytest
import torch

import lora_fx
from lora_fx import Rule

from bad_inputs import state, assert_unchanged, expect


@pytest.mark.parametrize("model", [lambda x: x, "model.pt", 3, None])
def test_model_not_a_module(model):
    expect(lora_fx.InputError, lambda: lora_fx.adapt(model, example_inputs=(torch.ones(1, 8),)),
           "nn.Module", type(model).__name__, "(at model)")
    expect(lora_fx.InputError, lambda: lora_fx.plan(model, example_inputs=(torch.ones(1, 8),)), "nn.Module")


@pytest.mark.parametrize("inputs", [("abc",), ["not", "tensors"], (torch.ones(3, 5),), ({"x": 1},)])
def test_example_inputs_not_tensors_that_fit(eval_mlp, inputs):
    model, _ = eval_mlp
    before = state(model)
    expect(lora_fx.InputError, lambda: lora_fx.adapt(model, example_inputs=inputs), "do not fit", "TinyMLP.forward")
    assert_unchanged(model, before)


def test_example_inputs_a_scalar(eval_mlp):
    model, _ = eval_mlp
    before = state(model)
    expect(lora_fx.InputError, lambda: lora_fx.adapt(model, example_inputs=3), "example_inputs", "int")
    assert_unchanged(model, before)


@pytest.mark.parametrize("rules, words", [
    ("fc1", ["str"]),
    (42, ["int"]),
    ([Rule(name="fc1"), "fc2"], ["rules[1]", "str"]),
    ([], ["empty"]),
    ({"name": "fc1", "r": "8"}, ["r must be a positive integer"]),
])
def test_rules_of_wrong_type(eval_mlp, rules, words):
    model, args = eval_mlp
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=rules, example_inputs=args, r=2), *words)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs, words", [
    ({"r": 0}, ["r must be a positive integer"]), ({"r": 2.5}, ["r must be a positive integer"]),
    ({"alpha": -1.0}, ["alpha must be a positive number"]), ({"dropout": 1.0}, ["dropout must be in [0, 1)"]),
])
def test_bad_default_settings(eval_mlp, kwargs, words):
    model, args = eval_mlp
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, example_inputs=args, **kwargs), *words)
    assert_unchanged(model, before)


def test_malformed_rule_fields():
    expect(lora_fx.RuleError, lambda: Rule(name="fc(", r=4), "not a valid regex")
    expect(lora_fx.RuleError, lambda: Rule(op="conv2d"), "unknown op kind", "conv2d")
    expect(lora_fx.RuleError, lambda: Rule(name=3), "`name` must be a string")


def test_unknown_frontend(eval_mlp):
    model, args = eval_mlp
    before = state(model)
    expect(lora_fx.InputError, lambda: lora_fx.adapt(model, example_inputs=args, frontend="jit"), "jit", "frontend")
    assert_unchanged(model, before)


