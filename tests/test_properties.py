"""Property-based tests (hypothesis) over random small models and random rule sets (tests/strategies.py).

Profiles: "ci" (default; derandomized, fixed examples) and "thorough" (LORA_FX_HYPOTHESIS=thorough, 300 examples
per property). The number of examples each property ran is added to pytest's terminal summary.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import lora_fx
from lora_fx.passes.infra import graph_signature
from lora_fx.passes.trace import trace

from strategies import cases

FAST = {"ci": 25, "thorough": 300}
SLOW = {"ci": 4, "thorough": 40}  # ONNX: two exports per example (~3-8 s); 300 would take ~30 min
PROFILE = os.environ.get("LORA_FX_HYPOTHESIS", "ci")
if PROFILE not in FAST:
    raise ValueError(f"LORA_FX_HYPOTHESIS={PROFILE!r}: use 'ci' or 'thorough'")
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", max_examples=FAST["ci"], derandomize=True, **_common)
settings.register_profile("thorough", max_examples=FAST["thorough"], derandomize=False, **_common)
settings.load_profile(PROFILE)  # module-level: the profile also applies to any later hypothesis test
fast = settings(max_examples=FAST[PROFILE])
slow = settings(max_examples=SLOW[PROFILE])

RAN: Counter = Counter()  # examples run per property, reported at the end of the module


class _CountReporter:
    """Adds the examples run per property to pytest's terminal summary (and prints it with -s)."""

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_sep("-", f"lora_fx properties, hypothesis profile {PROFILE!r}")
        for name, n in RAN.items():
            terminalreporter.write_line(f"{n:5d} examples  {name}")


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    reporter = _CountReporter()
    if request.config.pluginmanager.get_plugin("lora_fx_property_counts") is None:
        request.config.pluginmanager.register(reporter, "lora_fx_property_counts")
    yield
    print(f"\nhypothesis profile {PROFILE!r}: examples run per property: {dict(RAN)}")


def _adapt(model, args, rules, r):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an exclude rule may shadow a later one: "decides no site" warnings
        return lora_fx.adapt(model, rules=rules, example_inputs=args, r=r)


def _randomize(adapted, seed=0, scale=0.3):
    """Non-zero B (as after training) so folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(adapted):
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _snapshot(module):
    return ({k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
            {n: p.requires_grad for n, p in module.named_parameters()},
            {n: (type(m), id(m)) for n, m in module.named_modules()},
            {n: b.detach().clone() for n, b in module.named_buffers()},
            module.training)


def _assert_same(before, after, *, ignore_grad_flags=False):
    sd0, flags0, mods0, bufs0, train0 = before
    sd1, flags1, mods1, bufs1, train1 = after
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype and torch.equal(sd0[k], sd1[k]), k
    assert mods0 == mods1 and train0 == train1
    assert bufs0.keys() == bufs1.keys() and all(torch.equal(bufs0[k], bufs1[k]) for k in bufs0)
    if not ignore_grad_flags:
        assert flags0 == flags1


def _tolerance(out: torch.Tensor) -> float:
    # Folding changes only the rounding: fp32 computes W0·x + s·B(A·x) unfused vs (W0 + s·B·A)·x with the sum
    # rounded once to fp32, so errors are a few ulps of the output scale (1e-5 relative is ~100 ulps, room for
    # depth 3 + attention). bf16 rounds the folded weight to an 8-bit mantissa (eps 2^-8 ~ 4e-3) while the
    # unfolded branch adds the delta in fp32: per-layer error ~eps, compounding over up to 7 layers -> 5e-2.
    scale = out.detach().float().abs().max().item() + 1.0
    return (1e-5 if out.dtype == torch.float32 else 5e-2) * scale


@fast
@given(cases())
def test_adapted_equals_original_at_init(case):
    spec, model, args, rules, r = case
    expected = model(*args)
    adapted = _adapt(model, args, rules, r)
    got = adapted(*args)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    RAN["adapted == original at init"] += 1


@fast
@given(cases())
def test_only_lora_trains(case):
    spec, model, args, rules, r = case
    adapted = _adapt(model, args, rules, r)
    lora = {id(p) for p in lora_fx.lora_parameters(adapted)}
    assert lora
    assert all(p.dtype == torch.float32 for p in lora_fx.lora_parameters(adapted))  # fp32 LoRA on a bf16 base
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == lora  # everything not LoRA is frozen
    base = {n: p.detach().clone() for n, p in adapted.named_parameters() if id(p) not in lora}
    opt = torch.optim.SGD(trainable, lr=0.1)
    target = torch.randn(adapted(*args).shape, generator=torch.Generator().manual_seed(1)).to(args[0].dtype)
    for step in range(2):
        loss = F.mse_loss(adapted(*args).float(), target.float())
        opt.zero_grad()
        loss.backward()
        for n, p in adapted.named_parameters():
            assert (p.grad is not None) == (id(p) in lora), n
        opt.step()
    assert all(torch.equal(p, base[n]) for n, p in adapted.named_parameters() if id(p) not in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora_fx.lora_parameters(adapted))  # B got a gradient: it trains
    RAN["only LoRA trains"] += 1


@fast
@given(cases())
def test_fold_matches_adapted_and_gives_the_original_graph(case):
    spec, model, args, rules, r = case
    adapted = _adapt(model, args, rules, r)
    _randomize(adapted, seed=spec.seed)
    with torch.no_grad():
        want = adapted(*args)
    model_before, adapted_before = _snapshot(model), _snapshot(adapted)
    adapted_graph = graph_signature(lora_fx.graph(adapted).graph)
    folded = lora_fx.fold(adapted)
    # fold (default) leaves the adapted module and the user's model as they were
    _assert_same(model_before, _snapshot(model))
    _assert_same(adapted_before, _snapshot(adapted))
    assert graph_signature(lora_fx.graph(adapted).graph) == adapted_graph
    with torch.no_grad():
        got = folded(*args)
    assert got.dtype == want.dtype
    assert (got.float() - want.float()).abs().max().item() <= _tolerance(want)
    assert not any(n.startswith("lora_fx") for n, _ in folded.named_modules() if n)
    assert type(folded) is type(model)  # the user's own class
    fresh = trace(model, args, frontend=lora_fx.capture_info(adapted)["frontend"]).graph_module
    assert graph_signature(lora_fx.fold(lora_fx.graph(adapted)).graph) == graph_signature(fresh.graph)
    RAN["fold == adapted, graph == original, nothing changed"] += 1


@fast
@given(cases())
def test_merge_then_unmerge_restores_base_bit_for_bit(case):
    spec, model, args, rules, r = case
    adapted = _adapt(model, args, rules, r)
    _randomize(adapted, seed=spec.seed + 1)
    with torch.no_grad():
        want = adapted(*args)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_fx.merge_adapter(adapted)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base[n])]
    assert changed  # merging writes into the shared W0
    with torch.no_grad():
        merged_out = adapted(*args)  # branches disabled while merged: same function
    assert (merged_out.float() - want.float()).abs().max().item() <= _tolerance(want)
    lora_fx.unmerge_adapter(adapted)
    for n, p in model.named_parameters():
        assert p.dtype == base[n].dtype and torch.equal(p, base[n]), n
    with torch.no_grad():
        assert torch.equal(adapted(*args), want)
    RAN["merge/unmerge bit-exact"] += 1


@fast
@given(cases())
def test_adapt_changes_nothing_but_requires_grad(case):
    spec, model, args, rules, r = case
    before = _snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    adapted = _adapt(model, args, rules, r)
    _assert_same(before, _snapshot(model), ignore_grad_flags=True)
    # no copies: the adapted module reads the model's own parameter tensors
    shared = {id(p) for n, p in adapted.named_parameters() if not n.startswith("lora_fx")}
    assert shared <= {id(p) for p in params.values()}
    assert all(not p.requires_grad for p in params.values() if id(p) in shared)
    RAN["adapt changes only requires_grad"] += 1


@slow
@given(case=cases(dtypes=("float32",)))
def test_merged_onnx_identical_to_base_and_ort_agrees(case, tmp_path_factory):
    # fp32 only: ONNX Runtime's CPU provider has no bf16 MatMul/Gemm kernels for most of these ops.
    spec, model, args, rules, r = case
    tmp = tmp_path_factory.mktemp("onnx")
    adapted = _adapt(model, args, rules, r)
    _randomize(adapted, seed=spec.seed)
    merged = lora_fx.fold(adapted)
    lora_fx.export_onnx(model, tmp / "base.onnx", args)
    lora_fx.export_onnx(merged, tmp / "merged.onnx", args)
    report = lora_fx.verify_onnx(tmp / "base.onnx", tmp / "merged.onnx")
    assert report.identical, str(report)
    parity = lora_fx.check_parity(tmp / "merged.onnx", merged, args, device="cpu")
    assert parity.ok, str(parity)
    RAN["merged ONNX identical + ORT parity"] += 1
