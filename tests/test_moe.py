"""Mixture-of-experts: LoRA on expert weights (the "experts" site kind), on tiny Qwen3-MoE and Mixtral configs and a
symbolically traced loop over experts, in the three forms experts are consumed:

    grouped   torch.export graph, transformers' grouped_mm_fallback custom op (fp32 CPU) on W.transpose
    bmm       torch.export graph, aten.index(W, [ids]) + aten.bmm (experts_implementation="batched_mm")
    slice     torch.fx symbolic trace, F.linear(x, W[e]) and x @ W[e] in a loop over experts

Each: identity at init, training moves exactly the experts routing reaches, fold exact (fp32, 1e-5 of the output's
scale), PEFT target_parameters parity both ways; ONNX identity where the base exports (batched_mm: the grouped op has
no ONNX translation, docs/onnx.md).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import Rule
from lora_fx.lora_experts import LoraExperts
from zoo.catalogue import LoopMoE

transformers = pytest.importorskip("transformers")
KW = {"use_cache": False}


def _tiny(family: str, impl: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, num_experts_per_tok=2, max_position_embeddings=64)
    if family == "qwen3":
        config = transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=4, **common)
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = transformers.MixtralConfig(intermediate_size=16, num_local_experts=4, **common)
        model = transformers.MixtralForCausalLM(config)
    model.set_experts_implementation(impl)
    with torch.no_grad():  # HF leaves the expert tensors tiny or empty at init: give every expert its own weights
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.2)
    return model.eval()


def _loop_moe() -> nn.Module:  # the catalogue's LoopMoE (tests/zoo)
    torch.manual_seed(0)
    return LoopMoE().eval()


IDS = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(3))
CASES = {  # name: (model builder, frontend, example kwargs, expected site op)
    "qwen3-grouped": (lambda: _tiny("qwen3", "grouped_mm"), "export", KW, "grouped"),
    "qwen3-bmm": (lambda: _tiny("qwen3", "batched_mm"), "export", KW, "w_first"),
    "mixtral-grouped": (lambda: _tiny("mixtral", "grouped_mm"), "export", KW, "grouped"),
    "mixtral-bmm": (lambda: _tiny("mixtral", "batched_mm"), "export", KW, "w_first"),
    "loop-slice": (_loop_moe, "fx", {}, "x_first"),
}


def _out(model, kwargs):
    out = model(IDS, **kwargs)
    return (out.logits if hasattr(out, "logits") else out).detach()


def _expert_weights(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.dim() == 3]


def _routed(model, kwargs) -> dict[str, set[int]]:
    """Per expert weight, the experts the base's routing gives at least one token of IDS."""
    if isinstance(model, LoopMoE):
        with torch.no_grad():
            index = torch.topk(F.linear(model.embed(IDS), model.moe.router), 2, dim=-1).indices
        return {w: set(index.unique().tolist()) for w in ("moe.up", "moe.down")}
    chosen, hooks = {}, []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("TopKRouter"):
            layer = name.rpartition(".")[0]
            hooks.append(module.register_forward_hook(
                lambda m, i, o, layer=layer: chosen.setdefault(layer, set()).update(o[2].unique().tolist())))
    with torch.no_grad():
        model(IDS, **kwargs)
    for h in hooks:
        h.remove()
    return {w: chosen[w.rpartition(".")[0].rpartition(".")[0]] for w in _expert_weights(model)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_expert_lora_identity_training_fold(case):
    build, frontend, kwargs, op = CASES[case]
    model = build()
    base = _out(model, kwargs)
    routed = _routed(model, kwargs)
    plan = lora_fx.plan(model, example_inputs=(IDS,), example_kwargs=kwargs, frontend=frontend)
    experts = {d.site.weight: d for d in plan.decisions if "moe.experts" in d.site.roles}
    assert sorted(experts) == sorted(_expert_weights(model))
    assert {d.site.op for d in experts.values()} == {op} and all(d.adapted for d in experts.values())
    assert all(not d.adapted for d in plan.decisions if "moe.router" in d.site.roles)  # the router stays frozen
    assert any("moe.router" in d.site.roles for d in plan.decisions)

    adapted = lora_fx.adapt(model, Rule(role="moe.experts", r=4, alpha=8), example_inputs=(IDS,),
                            example_kwargs=kwargs, frontend=frontend)
    assert torch.equal(_out(adapted, kwargs), base)  # B = 0: exactly the base
    loras = {lora.weight_name: lora for lora in adapted.lora_fx.values()}
    assert all(isinstance(l, LoraExperts) for l in loras.values()) and len(loras) == len(experts)
    opt = torch.optim.SGD(lora_fx.trainable_parameters(adapted), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        out = adapted(IDS, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out
        F.cross_entropy(logits.flatten(0, 1), IDS.flatten()).backward()
        opt.step()
    for weight, lora in loras.items():
        moved = {e for e in range(lora.num_experts) if lora.lora_B[e].abs().max() > 0}
        assert moved == routed[weight], weight  # every routed expert learns, the others stay at B = 0
    trained = _out(adapted, kwargs)
    assert (trained - base).abs().max() > 1e-3
    merged = lora_fx.fold(adapted)
    scale = trained.abs().max()
    assert (_out(merged, kwargs) - trained).abs().max() <= 1e-5 * scale


def test_router_is_adapted_only_when_named():
    model = _tiny("qwen3", "grouped_mm")
    plan = lora_fx.plan(model, Rule(role="moe.router", r=2), example_inputs=(IDS,), example_kwargs=KW)
    adapted = [d.site.name for d in plan.decisions if d.adapted]
    assert adapted == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    plan = lora_fx.plan(model, Rule(role="mlp", r=2), example_inputs=(IDS,), example_kwargs=KW)
    assert all("experts" in d.site.name for d in plan.adapted)  # the experts are on the MLP path, the router not
    assert "4x32x32" in plan.table()  # num_experts x out x in


def test_grouped_branch_same_on_both_paths():
    """torch._grouped_mm and the gather fallback (used where the kernel cannot run) compute the same branch."""
    torch.manual_seed(0)
    lora = LoraExperts(4, 32, 16, r=4, alpha=8)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(10, 32)
    offs = torch.tensor([3, 3, 7, 10], dtype=torch.int32)
    grouped = lora(x, offs, "grouped")
    per_expert = torch.cat([lora(x[a:b], e, "x_first") for e, (a, b) in enumerate([(0, 3), (3, 3), (3, 7), (7, 10)])])
    torch.testing.assert_close(grouped, per_expert)
    lora.r = 3  # strides no longer a multiple of 16 bytes: the fallback runs
    lora.lora_A.data, lora.lora_B.data = lora.lora_A.data[:, :3], lora.lora_B.data[:, :, :3]
    per_expert = torch.cat([lora(x[a:b], e, "x_first") for e, (a, b) in enumerate([(0, 3), (3, 3), (3, 7), (7, 10)])])
    torch.testing.assert_close(lora(x, offs, "grouped"), per_expert)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family", ["qwen3", "mixtral"])
def test_merged_onnx_identical_to_base(tmp_path, family, impl):
    """grouped_mm exports through lora_fx's translation of transformers' grouped_mm custom op (ONNX Runtime parity
    1e-5: the same fp32 products, summed in another order); batched_mm through the exporter's own ops."""
    pytest.importorskip("onnxscript")
    model = _tiny(family, impl)
    adapted = lora_fx.adapt(model, Rule(role="moe.experts", r=4), example_inputs=(IDS,), example_kwargs=KW)
    with torch.no_grad():
        for p in lora_fx.trainable_parameters(adapted):
            p.normal_(0, 0.1)
    merged = lora_fx.fold(adapted)
    lora_fx.export_onnx(model, tmp_path / "base.onnx", example_inputs=(IDS,), example_kwargs=KW)
    lora_fx.export_onnx(merged, tmp_path / "merged.onnx", example_inputs=(IDS,), example_kwargs=KW)
    report = lora_fx.verify_onnx(tmp_path / "base.onnx", tmp_path / "merged.onnx")
    assert report.identical, report
    parity = lora_fx.check_parity(tmp_path / "merged.onnx", merged, (IDS,), KW, atol=1e-5, rtol=1e-5)
    assert parity.ok, parity


PEFT_CASES = {  # case: target_parameters
    "qwen3-grouped": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "mixtral-bmm": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "loop-slice": ["moe.up", "moe.down"],
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_target_parameters_both_ways(tmp_path, case):
    peft = pytest.importorskip("peft")
    build, frontend, kwargs, _ = CASES[case]
    model = build()
    targets = ["q_proj"] if case != "loop-slice" else ["head"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, target_parameters=PEFT_CASES[case],
                             init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
        expected = _out(theirs, kwargs)
        theirs.save_pretrained(tmp_path / "peft")
        merged = theirs.merge_and_unload()
    # PEFT -> lora_fx: same outputs, and fold gives merge_and_unload's weights
    adapted = lora_fx.load_peft_adapter(copy.deepcopy(model), tmp_path / "peft", example_inputs=(IDS,),
                                        example_kwargs=kwargs, frontend=frontend)
    scale = expected.abs().max()
    assert (_out(adapted, kwargs) - expected).abs().max() <= 1e-5 * scale
    assert (expected - _out(model, kwargs)).abs().max() > 1e-3  # the adapter changes the model
    folded = lora_fx.fold(adapted).state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(folded[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # lora_fx -> PEFT: another adapter (new B), written by save_peft_adapter, loads in PEFT with the same outputs
    with torch.no_grad():
        for p in lora_fx.trainable_parameters(adapted):
            p.add_(torch.randn_like(p) * 0.05)
    ours = _out(adapted, kwargs)
    lora_fx.save_peft_adapter(adapted, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    assert (_out(loaded, kwargs) - ours).abs().max() <= 1e-5 * ours.abs().max()


def test_lora_fx_adapter_file_round_trip(tmp_path):
    """save_adapter writes each expert weight's A (E, r, in) and B (E, out, r); adapt_from_adapter rebuilds them."""
    model = _tiny("qwen3", "grouped_mm")
    adapted = lora_fx.adapt(copy.deepcopy(model), Rule(role="moe.experts", r=4), example_inputs=(IDS,),
                            example_kwargs=KW)
    with torch.no_grad():
        for p in lora_fx.trainable_parameters(adapted):
            p.normal_(0, 0.1)
    lora_fx.save_adapter(adapted, tmp_path / "adapter")
    again = lora_fx.adapt_from_adapter(copy.deepcopy(model), tmp_path / "adapter", example_inputs=(IDS,),
                                       example_kwargs=KW)
    assert torch.equal(_out(again, KW), _out(adapted, KW))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapted_moe_compiles_in_one_graph(dtype):
    """torch.compile sees the grouped LoRA as ordinary ops: one graph, no break (torch._grouped_mm's meta kernel takes
    bf16 only, so fp32 branches take the gather path while compiling)."""
    model = _tiny("qwen3", "grouped_mm").to(dtype)
    adapted = lora_fx.adapt(model, Rule(role="moe.experts", r=8), example_inputs=(IDS,), example_kwargs=KW)
    adapted(IDS, **KW)
    explained = torch._dynamo.explain(adapted)(IDS, **KW)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_router_lora_saves_as_peft_target_parameters(tmp_path):
    """A rule that names the router adapts it (F.linear on the router's bare 2-D weight); save_peft_adapter writes it
    and the experts as target_parameters, which PEFT loads with the same outputs, and lora_fx loads back."""
    peft = pytest.importorskip("peft")
    model = _tiny("qwen3", "grouped_mm")
    adapted = lora_fx.adapt(copy.deepcopy(model), Rule(role=["moe.experts", "moe.router"], r=2),
                            example_inputs=(IDS,), example_kwargs=KW)
    assert sum(w.endswith("gate.weight") for w in (l.weight_name for l in adapted.lora_fx.values())) == 2
    with torch.no_grad():
        for p in lora_fx.trainable_parameters(adapted):
            p.normal_(0, 0.1)
    ours = _out(adapted, KW)
    lora_fx.save_peft_adapter(adapted, tmp_path / "p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "p").eval()
    assert (_out(theirs, KW) - ours).abs().max() <= 1e-5 * ours.abs().max()
    again = lora_fx.load_peft_adapter(copy.deepcopy(model), tmp_path / "p", example_inputs=(IDS,), example_kwargs=KW)
    assert torch.equal(_out(again, KW), ours)
