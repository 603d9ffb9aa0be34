"""Bad inputs, rules: rules that conflict, match nothing, ask too much, or select a tied weight.

What each case checks: tests/bad_inputs.py.
"""

from __future__ import annotations


import torch

import lora_fx
from lora_fx import Rule

from bad_inputs import state, assert_unchanged, expect, Twice, Tied


def test_rules_conflict_on_one_weight():
    torch.manual_seed(0)
    model, x = Twice(), torch.randn(2, 8)
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=[Rule(name="fc", op="linear_module", r=2),
                                                                   Rule(name="fc", op="functional_linear", r=4)],
                                                    example_inputs=(x,)),
           "fc.weight", "2 sites", "r=2", "r=4")
    assert_unchanged(model, before)


def test_rule_matches_nothing_under_strict(eval_mlp):
    model, args = eval_mlp
    rules = [Rule(name="fc1", r=2), Rule(name="fc3", r=2)]
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=rules, example_inputs=args, strict=True),
           "rules[1]", "fc3")
    assert_unchanged(model, before)


def test_no_rule_matches_any_site(eval_mlp):
    model, args = eval_mlp
    before = state(model)
    expect(lora_fx.NoSitesError, lambda: lora_fx.adapt(model, rules=[Rule(name="query")], example_inputs=args),
           "no rule matched", "'fc1'", "'fc2'", "query")
    assert_unchanged(model, before)


def test_rank_too_large_under_strict(eval_mlp):
    """A rule whose r exceeds a selected layer's min(in, out) is capped with a warning; strict=True refuses it."""
    model, args = eval_mlp
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=[Rule(name="fc2", r=5)], example_inputs=args,
                                                    strict=True),
           "r=5", "min(in, out)", "fc2 (r=4)", "lower r")
    assert_unchanged(model, before)


def test_rule_selects_a_tied_weight():
    model = Tied()
    before = state(model)
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(model, rules=[Rule(name="head", r=2)],
                                                    example_inputs=(torch.tensor([[1, 2, 3]]),)),
           "tied", "head.weight", "untie=True")
    assert_unchanged(model, before)




def test_no_rule_matched_lists_each_candidate_once():
    """A weight read at two sites (GPT-2's tied lm_head reads the embedding table too) is one candidate."""
    class Reused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    message = expect(lora_fx.NoSitesError, lambda: lora_fx.adapt(Reused(), [lora_fx.Rule(name="q_proj")],
                                                                 example_inputs=(torch.randn(2, 4),)),
                     "no rule matched any of the 1 candidate sites: ['fc']")
    assert message.count("'fc'") == 1
