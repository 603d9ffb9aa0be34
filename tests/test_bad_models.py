"""Bad inputs, models: models lora_fx cannot take: empty, nothing to adapt, untraceable, mode-dependent.

What each case checks: tests/bad_inputs.py.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import lora_fx

from bad_inputs import state, assert_unchanged, expect, ModeDependent


def test_empty_model():
    model = nn.Sequential()
    expect(lora_fx.NoSitesError, lambda: lora_fx.adapt(model, example_inputs=(torch.ones(2, 4),)),
           "no linear-like site", "Sequential")
    assert list(model.modules()) == [model]


def test_model_without_linear_sites():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    before = state(model)
    expect(lora_fx.NoSitesError, lambda: lora_fx.adapt(model, example_inputs=(torch.ones(2, 4),)),
           "no linear-like site", "open_modules")
    assert_unchanged(model, before)


def test_model_that_no_front_end_traces():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    model = DataDependent()
    before = state(model)
    expect(lora_fx.TraceError, lambda: lora_fx.adapt(model, example_inputs=(torch.ones(2, 4),), r=2),
           "torch.fx symbolic tracing", "torch.export", "DataDependent")
    assert_unchanged(model, before)


def test_model_in_train_mode_with_a_mode_dependent_forward():
    """Not an error: the adapted model runs the forward's train branch in train mode and its eval branch in eval
    mode, as the model does (F.dropout(training=self.training) is common); the model keeps its mode."""
    torch.manual_seed(0)
    model, x = ModeDependent().train(), torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted = lora_fx.adapt(model, example_inputs=(x,), r=2, frontend="fx")
    assert model.training
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x), rtol=0, atol=0)  # the train branch ("* 2")
        adapted.eval()
        torch.testing.assert_close(adapted(x), model.fc(x), rtol=0, atol=0)  # the eval branch
    assert not any(p.requires_grad for p in model.parameters())  # adapt went through (and froze the base)




class Branches(nn.Module):
    """torch.cond: torch.export keeps each branch as a subgraph, which no pass matches or rewrites."""

    def __init__(self, head: bool):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 2) if head else nn.Identity()

    def forward(self, x):
        return self.head(torch.cond(x.sum() > 0, lambda t: self.a(t), lambda t: self.b(t), (x,)))


def test_layers_inside_torch_cond_are_named_not_silently_left_out():
    x = torch.randn(2, 4)
    only_branches = Branches(head=False)
    before = state(only_branches)
    expect(lora_fx.NoSitesError, lambda: lora_fx.adapt(only_branches, example_inputs=(x,)),
           "read only inside control flow", "torch.cond", "a.weight", "b.weight", "torch.where")
    assert_unchanged(only_branches, before)
    with_head = Branches(head=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = lora_fx.adapt(with_head, example_inputs=(x,))
    assert [l.weight_name for l in adapted.lora_fx.values()] == ["head.weight"]
    assert any("['a.weight', 'b.weight']; they get no LoRA" in str(w.message) for w in caught), caught
    expect(lora_fx.RuleError, lambda: lora_fx.adapt(Branches(head=True), example_inputs=(x,), strict=True),
           "torch.cond", "a.weight")


def test_rules_that_select_only_sites_that_cannot_take_a_lora():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.grouped = nn.Linear(4, 4), nn.Conv2d(4, 4, 1, groups=2)

        def forward(self, x):
            return self.fc(self.grouped(x[..., None, None]).flatten(1))

    model = Grouped()
    before = state(model)
    expect(lora_fx.NoSitesError, lambda: lora_fx.adapt(model, [lora_fx.Rule(op="conv")],
                                                       example_inputs=(torch.randn(2, 4),)),
           "the rules select 1 site(s), but none can take a LoRA", "grouped: a grouped convolution", "Rule(op='conv')")
    assert_unchanged(model, before)
