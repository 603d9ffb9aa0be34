"""Every kind of site (lora_fx.site_kinds) end to end: adapt, identity at init, training moves the output, fold is
exact, the merged ONNX export is identical to the base's, ONNX Runtime agrees, adapter files round-trip.

Tolerances: fold parity 1e-5 relative to the output's scale (fp32; folding only reorders sums: the conv fold adds
B∘A to a 3x3 kernel, K = in·9 <= 72 terms per output); ORT parity is lora_fx.check_parity's fp32 default (1e-4).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import Rule

import zoo as Z


class ConvNet(nn.Module):
    """Conv1d with padding, Conv2d with stride and dilation, a 1x1 Conv2d, a grouped conv and a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.seq = nn.Conv1d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.pointwise(torch.relu(self.dilated(torch.relu(self.stem(x))))))
        h = self.depthwise(self.grouped(h)).flatten(2)  # (b, 16, h*w)
        return self.head(self.seq(h).mean(-1))


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 16, padding_idx=0)
        self.pos = nn.Embedding(12, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.out(self.tok(ids) + self.pos(positions))


def conv_net():
    torch.manual_seed(0)
    return ConvNet().eval(), (torch.randn(2, 3, 16, 16),)


def embedder():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    ids[0, -2:] = 0  # padding
    return Embedder().eval(), (ids,)


CASES = {
    "conv": (conv_net, [Rule(name="grouped|depthwise", exclude=True), Rule(op="conv", r=4)], 4),
    "embedding": (embedder, [Rule(op="embedding", r=4)], 2),
}


def _out(module, args):
    with torch.no_grad():
        return module(*args)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kind_end_to_end(tmp_path, case, frontend):
    build, rules, n_loras = CASES[case]
    model, args = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = lora_fx.adapt(model, rules, example_inputs=args, frontend=frontend)
    branches = [l for l in adapted.lora_fx.values() if type(l).__name__ != "LoraLinear"]
    assert len(branches) == n_loras
    assert torch.equal(_out(adapted, args), _out(model, args))  # B = 0

    opt = torch.optim.AdamW(lora_fx.lora_parameters(adapted), lr=1e-2)
    target = torch.randn_like(_out(model, args))
    for _ in range(3):
        loss = nn.functional.mse_loss(adapted(*args), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(l.lora_B.abs().sum() > 0 for l in branches)  # every branch trained
    y = _out(adapted, args)
    assert (y - _out(model, args)).abs().max() > 1e-3

    merged = lora_fx.fold(adapted)
    err, scale = Z.max_err(_out(merged, args), y)
    assert err <= 1e-5 * scale, err
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model unchanged

    base_path = lora_fx.export_onnx(model, tmp_path / "base.onnx", args)
    merged_path = lora_fx.export_onnx(merged, tmp_path / "merged.onnx", args)
    assert lora_fx.verify_onnx(base_path, merged_path).identical
    assert lora_fx.check_parity(merged_path, merged, args).ok

    lora_fx.save_adapter(adapted, tmp_path / "adapter")
    again = lora_fx.adapt_from_adapter(copy.deepcopy(model), tmp_path / "adapter", example_inputs=args)
    assert torch.equal(_out(again, args), y)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_embedding_branch_adds_in_the_tables_dtype(frontend):
    """A bf16 model keeps fp32 LoRA weights (site_kinds._lora_dtype); the embedding branch must still hand bf16 to
    the next linear (ids carry no dtype to cast back to) and train through it, with two adapters stacked."""
    model, args = embedder()
    model = model.to(torch.bfloat16)
    adapted = lora_fx.adapt(model, [Rule(op="embedding", r=4)], example_inputs=args, frontend=frontend)
    lora_fx.add_adapter(adapted, "second", [Rule(op="embedding", r=2)])
    branches = [*adapted.lora_fx.values(), *adapted.lora_fx_second.values()]
    assert len(branches) == 4 and {l.lora_A.dtype for l in branches} == {torch.float32}
    out = adapted(*args)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _out(model, args))  # B = 0 for both adapters
    out.float().square().mean().backward()
    assert all(l.lora_B.grad is not None and l.lora_B.grad.abs().sum() > 0 for l in branches)
    assert adapted.tok(args[0]).dtype == torch.bfloat16  # a direct call of the submodule (a forward hook) too
    merged = lora_fx.fold(adapted)
    assert merged(*args).dtype == torch.bfloat16


def test_rules_none_adapts_only_linear_sites_and_plan_says_why():
    model, args = conv_net()
    plan = lora_fx.plan(model, example_inputs=args)
    rows = {r["site"]: r for r in plan.rows()}
    assert [name for name, r in rows.items() if r["adapted"]] == ["head"]
    assert "Rule(op='conv')" in rows["stem"]["why"]
    model, args = embedder()
    rows = {r["site"]: r for r in lora_fx.plan(model, example_inputs=args).rows()}
    assert not rows["tok"]["adapted"] and "Rule(op='embedding')" in rows["tok"]["why"]
    # a rule that does not name convolutions or embeddings does not take them either
    rows = {r["site"]: r for r in lora_fx.plan(model, [Rule(r=2)], example_inputs=args).rows()}
    assert [name for name, r in rows.items() if r["adapted"]] == ["out"]


def test_grouped_convolutions_are_left_out_with_a_reason():
    model, args = conv_net()
    with pytest.warns(UserWarning, match=r"cannot take a LoRA .*grouped.*groups=4"):
        adapted = lora_fx.adapt(model, [Rule(op="conv", r=2)], example_inputs=args)
    assert sorted(l.weight_name for l in adapted.lora_fx.values()) == [
        "dilated.weight", "pointwise.weight", "seq.weight", "stem.weight"]
    with pytest.raises(lora_fx.RuleError, match="grouped convolution"):
        lora_fx.adapt(model, [Rule(op="conv", r=2)], example_inputs=args, strict=True)


def test_conv_rank_is_capped_by_its_fan_in():
    """A conv's A sees in·k·k inputs: the 3-channel stem takes r=16 (<= 27), a 1-channel 1x1 conv only r=1."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = lora_fx.adapt(model, [Rule(op="conv", r=16)], example_inputs=(torch.randn(1, 3, 8, 8),))
    assert {l.weight_name: l.r for l in adapted.lora_fx.values()} == {"0.weight": 16, "1.weight": 1}


def test_tied_embedding_is_refused_unless_untied():
    model, args, kwargs = Z.tied_lm()
    with pytest.raises(lora_fx.RuleError, match="tied"):
        lora_fx.adapt(model, [Rule(op="embedding")], example_inputs=args, example_kwargs=kwargs, frontend="fx")


# ------------------------------------------------------------------------------------------------ PEFT both ways
class PeftNet(nn.Module):
    """Conv2d and Conv1d (PEFT's LoRA conv has no dilation), an embedding with padding_idx, and a Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.out = nn.Linear(8, 4)

    def forward(self, ids, img):
        h = self.conv(img).flatten(2).mean(-1) + self.emb(ids).mean(1)  # (b, 8)
        return self.out(self.conv1d(h[:, :, None].expand(-1, -1, 5)).mean(-1))


def peft_net():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    return PeftNet().eval(), (torch.randint(0, 30, (2, 6), generator=g), torch.randn(2, 3, 8, 8, generator=g))


PEFT_TARGETS = ["emb", "conv", "conv1d", "out"]


def test_peft_conv_and_embedding_adapters_load_with_peft_outputs(tmp_path):
    """A PEFT adapter with LoRA on Conv2d, Conv1d, Embedding and Linear loads into lora_fx with PEFT's outputs;
    its fold equals PEFT's merge_and_unload. Tolerance 1e-5: both compute the same fp32 ops (measured <= 1e-6)."""
    peft = pytest.importorskip("peft")
    model, args = peft_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=PEFT_TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "peft")
    want = _out(pm.eval(), args)
    assert (want - _out(model, args)).abs().max() > 0.1  # the adapter matters
    adapted = lora_fx.load_peft_adapter(copy.deepcopy(model), tmp_path / "peft", example_inputs=args)
    assert sorted(type(l).__name__ for l in adapted.lora_fx.values()) == [
        "LoraConv", "LoraConv", "LoraEmbedding", "LoraLinear"]
    assert torch.allclose(_out(adapted, args), want, atol=1e-5)
    merged = pm.merge_and_unload()
    folded = lora_fx.fold(adapted)
    for name in ("emb.weight", "conv.weight", "conv1d.weight", "out.weight"):
        assert torch.allclose(folded.get_parameter(name), merged.get_parameter(name), atol=1e-6), name


def test_lora_fx_conv_and_embedding_adapters_save_as_peft_folders(tmp_path):
    peft = pytest.importorskip("peft")
    model, args = peft_net()
    adapted = lora_fx.adapt(copy.deepcopy(model), [Rule(name="|".join(PEFT_TARGETS), r=4, alpha=8)],
                            example_inputs=args)
    torch.manual_seed(2)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_B.normal_(0, 0.5)
    lora_fx.save_peft_adapter(adapted, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    want = _out(adapted, args)
    assert (want - _out(model, args)).abs().max() > 0.1
    assert torch.allclose(_out(pm, args), want, atol=1e-5)


def test_dilated_convolutions_are_refused_by_save_peft_adapter(tmp_path):
    model, args = conv_net()
    adapted = lora_fx.adapt(model, [Rule(name="dilated", r=2)], example_inputs=args)
    with pytest.raises(lora_fx.AdapterFileError, match="dilated convolution"):
        lora_fx.save_peft_adapter(adapted, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("name, targets", [
    ("timm_resnet18", ["conv1", "conv2", "fc"]),  # every block's convolutions and the classifier
    ("bert", ["word_embeddings", "position_embeddings", "query", "value"]),
])
def test_peft_both_ways_on_real_models(tmp_path, name, targets):
    """PEFT -> lora_fx (same outputs, same merged weights) and lora_fx -> PEFT (same outputs) on a timm ResNet's
    convolutions and a transformers BERT's embeddings. Tolerance 1e-4 on outputs: 2 blocks of fp32 ops computed in
    the same order by both; measured <= 1e-6."""
    peft = pytest.importorskip("peft")
    model, args, kwargs = getattr(Z, name)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(1)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_B" in pname or "lora_embedding_B" in pname:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "peft")
    first = lambda out: Z.first_output(out)
    with torch.no_grad():
        want, base = first(pm.eval()(*args, **kwargs)), first(model(*args, **kwargs))
    assert (want - base).abs().max() > 1e-2  # the adapter matters
    adapted = lora_fx.load_peft_adapter(copy.deepcopy(model), tmp_path / "peft", example_inputs=args,
                                        example_kwargs=kwargs)
    with torch.no_grad():
        assert torch.allclose(first(adapted(*args, **kwargs)), want, atol=1e-4)
    lora_fx.save_peft_adapter(adapted, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.allclose(first(again(*args, **kwargs)), want, atol=1e-4)
