"""A quantized frozen base (issue 18): NF4 (torchao) and FP8 weights under the LoRA, and both folds.

Tolerances: NF4 codes a weight with 16 levels per block, so the quantized model differs from the original by the
quantization error (about 10% of the output of this small uniform-init MLP; NF4 is made for normal weights): tests check that error is there and bounded, and that the
dequantized fold reproduces the trained quantized model to fp32 rounding (1e-5). FP8 (e4m3, 3 mantissa bits) also
scales the activations per step, so its model is within ~4% of fp32; the CPU runs the reference matmul (codes times
scales in fp32), and the CUDA test checks torch._scaled_mm against it.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import Rule
from lora_fx.errors import FoldError, InputError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _has_torchao() -> bool:
    """Without importing it at collection: torchao registers ops and patches when imported, which the other test
    files should not run under."""
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


needs_torchao = pytest.mark.skipif(not _has_torchao(), reason="torchao (the quant extra) is not installed")
KINDS = [pytest.param("nf4", marks=needs_torchao), "fp8"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def x_of(seed: int, batch: int = 8) -> torch.Tensor:
    return torch.randn(batch, 64, generator=torch.Generator().manual_seed(seed))


def adapted_mlp(seed: int = 0):
    torch.manual_seed(seed)
    model = MLP()
    return model, lora_fx.adapt(model, Rule(name="up|down", r=4), example_inputs=(x_of(0),))


def train(adapted, steps: int = 8, dtype: torch.dtype = torch.float32) -> list[float]:
    opt = torch.optim.AdamW(lora_fx.trainable_parameters(adapted), lr=1e-2)
    losses = []
    for i in range(steps):
        loss = (adapted(x_of(i).to(dtype)).float() - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_lm(model, adapted, ids: torch.Tensor, steps: int = 3) -> list[float]:
    """A few steps of a transformers LM on its own labels (the loss it returns), through `model` (the adapted model
    or a view of it), training `adapted`'s LoRA."""
    opt = torch.optim.AdamW(lora_fx.trainable_parameters(adapted), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", KINDS)
def test_the_quantized_base_trains_and_folds_into_the_model_it_trained(kind):
    model, adapted = adapted_mlp()
    x = x_of(99)
    before = model(x).detach()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = lora_fx.quantize_base(adapted, kind)
    assert sorted(report.quantized) == ["down.weight", "up.weight"] and not report.skipped
    assert 0.001 < rel(adapted(x), before) < 0.2  # the quantization error is there, and bounded
    graph_code = lora_fx.graph(adapted).code
    assert graph_code.count("lora_fx_base") == 2  # both linear calls read their quantized matmul

    losses = train(adapted)
    assert losses[-1] < 0.8 * losses[0]
    assert {id(p) for p in lora_fx.trainable_parameters(adapted)} == \
        {id(p) for p in adapted.parameters() if p.requires_grad}
    adapted.eval()
    trained = adapted(x).detach()

    held_out = [x_of(100 + i) for i in range(3)]
    comparison = lora_fx.compare_folds(adapted, held_out)
    assert comparison.closer == "dequantized" and set(comparison.rel_l2) == {"dequantized", "original"}
    assert comparison.rel_l2["dequantized"] < comparison.rel_l2["original"]
    merged = lora_fx.fold(adapted)  # auto: the closer one
    assert type(merged) is MLP
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in merged.parameters())
    if kind == "nf4":  # the dequantized fold is the trained function itself, up to fp32 rounding
        assert comparison.rel_l2["dequantized"] < 1e-5
        torch.testing.assert_close(merged(x), trained, atol=1e-5, rtol=1e-5)
    else:  # FP8 also quantizes the activations: the merged model is within that error
        assert rel(merged(x), trained) < 0.05

    # the original-precision fold is W0 + delta: the unquantized weights plus the same LoRA
    merged_original = lora_fx.fold(adapted, base="original")
    for name in ("up", "down"):
        lora = getattr(adapted, "lora_fx")[name]
        expected = original[f"{name}.weight"].double() + lora.scaling * (lora.lora_B.double() @ lora.lora_A.double())
        torch.testing.assert_close(getattr(merged_original, name).weight, expected.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(merged_original.head.weight, original["head.weight"])


class Chained(nn.Module):
    """Linear calls that read one another's outputs with nothing between: b(a(x)), a weight applied twice, x @ W1 @ W2."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.twice = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.w1 = nn.Parameter(torch.randn(64, 64) / 8)
        self.w2 = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x):
        return self.twice(self.twice(self.b(self.a(x)))) + (x @ self.w1) @ self.w2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_chained_quantized_linears_fold_both_ways(kind, frontend):
    """The quantized call of `b` reads the LoRA add node of `a`: fold must put the calls back before it removes the
    LoRA nodes (it raised KeyError: 'add' the other way round)."""
    torch.manual_seed(0)
    model = Chained().eval()
    adapted = lora_fx.adapt(model, example_inputs=(x_of(0),), r=4, frontend=frontend)
    for lora in adapted.lora_fx.values():
        nn.init.normal_(lora.lora_B, std=0.05)
    x = x_of(1)
    with torch.no_grad():
        unquantized_fold = lora_fx.fold(adapted)(x)  # W0 + delta
    report = lora_fx.quantize_base(adapted, kind)
    assert len(report.quantized) == 5
    with torch.no_grad():
        trained = adapted(x)
        comparison = lora_fx.compare_folds(adapted, [x])
        dequantized = lora_fx.fold(adapted, base="dequantized")
        original = lora_fx.fold(adapted, base="original")
        assert type(dequantized) is Chained and type(original) is Chained
        torch.testing.assert_close(original(x), unquantized_fold, atol=1e-5, rtol=1e-5)
        # NF4: the trained function itself; FP8 also quantized the activations, which no merged weight can
        assert rel(dequantized(x), trained) < (1e-5 if kind == "nf4" else 0.1)
    assert comparison.closer == "dequantized"


@needs_torchao
def test_nf4_stores_4_bits_a_weight_and_direct_calls_use_it():
    model, adapted = adapted_mlp()
    report = lora_fx.quantize_base(adapted, "nf4", which="all")
    assert sorted(report.quantized) == ["down.weight", "head.weight", "up.weight"]
    assert report.bytes_after < 0.2 * report.bytes_before  # 4 bits + scales against fp32
    assert type(model.up.weight).__name__ == "NF4Tensor"  # in the user's module: that is the memory saving
    x = x_of(3)
    direct = adapted.up(x)  # a direct call of a quantized nn.Linear runs torchao's NF4 linear, LoRA added
    torch.testing.assert_close(direct, lora_fx.graph(adapted).up(x) + adapted.lora_fx["up"](x))
    merged = lora_fx.fold(adapted)
    assert type(merged.head.weight) is nn.Parameter  # quantized without a LoRA: written back plain


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_base_under_torch_compile_matches_eager(kind):
    _, adapted = adapted_mlp()
    lora_fx.quantize_base(adapted, kind)
    x = x_of(5).requires_grad_(True)
    eager = adapted(x)
    (grad,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(adapted, backend="aot_eager", fullgraph=True)(x)  # one graph: no break at the base
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(compiled.sum(), x)[0], grad, atol=1e-5, rtol=1e-5)


def test_fp8_matmul_and_its_gradient_follow_the_fp32_product():
    from lora_fx.fp8 import Fp8Weight

    torch.manual_seed(0)
    w, x = torch.randn(48, 32), torch.randn(10, 32, requires_grad=True)
    layer = Fp8Weight(w)
    y = layer(x)
    assert rel(y, x @ w.t()) < 0.05  # e4m3: 3 mantissa bits on both operands
    g = torch.randn_like(y)
    y.backward(g)
    assert rel(x.grad, g @ w) < 0.05
    assert layer.w8.dtype == torch.float8_e4m3fn and layer.wt8.shape == (32, 48)
    assert "w8" not in layer.state_dict()  # derived from the weight: not saved


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_model_casts_and_copies_like_a_model(kind):
    """What users do to any model: .to(torch.bfloat16) after quantize_base (the quantized forms keep their own
    dtypes; the fold follows the model's new dtype), and copy.deepcopy (an exact copy of the codes and scales)."""
    import copy

    _, adapted = adapted_mlp()
    lora_fx.quantize_base(adapted, kind)
    train(adapted, steps=2)
    adapted.eval()
    x = x_of(7)

    twin = copy.deepcopy(adapted)
    torch.testing.assert_close(twin(x), adapted(x), atol=0, rtol=0)  # bit for bit: nothing was quantized again
    torch.testing.assert_close(lora_fx.fold(twin)(x), lora_fx.fold(adapted)(x), atol=0, rtol=0)

    twin.to(torch.bfloat16)
    for name, buffer in twin.named_buffers():
        if name.startswith("lora_fx_base."):  # FP8 codes stay e4m3, their scales fp32
            assert buffer.dtype in (torch.float8_e4m3fn, torch.float32), name
    y = twin(x.bfloat16())
    assert y.dtype == torch.bfloat16 and rel(y.float(), adapted(x)) < 0.05  # bf16 activations
    for base, tolerance in (("dequantized", 0.05), ("original", 0.2)):  # original: W0, without the quantization
        merged = lora_fx.fold(twin, base=base)                            # error the LoRA was trained against
        assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
        assert rel(merged(x.bfloat16()).float(), y.float()) < tolerance


@pytest.mark.parametrize("kind", KINDS)
def test_an_adapter_file_rebuilds_the_quantized_base_it_was_trained_against(kind, tmp_path):
    """Deploy in another process: the adapter file records the quantized base (kind, weights, blocks, the fold
    compare_folds chose), adapt_from_adapter on the original model rebuilds it, and the fold is the one trained."""
    import copy
    import json

    model, adapted = adapted_mlp()
    pristine = copy.deepcopy(model)  # the user's original model, as it is on disk (NF4 quantizes `model` itself)
    lora_fx.quantize_base(adapted, kind, which="all")
    train(adapted, steps=4)
    adapted.eval()
    lora_fx.compare_folds(adapted, [x_of(100 + i) for i in range(2)])
    lora_fx.save_adapter(adapted, tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["quantized_base"]
    assert record["kind"] == kind and record["weights"] == ["down.weight", "head.weight", "up.weight"]
    assert record["fold"] == "dequantized"

    rebuilt = lora_fx.adapt_from_adapter(copy.deepcopy(pristine), tmp_path / "adapter", example_inputs=(x_of(0),))
    x = x_of(7)
    torch.testing.assert_close(rebuilt(x), adapted(x), atol=0, rtol=0)  # the same codes, the same function
    torch.testing.assert_close(lora_fx.fold(rebuilt)(x), lora_fx.fold(adapted)(x), atol=0, rtol=0)

    plain = lora_fx.adapt_from_adapter(copy.deepcopy(pristine), tmp_path / "adapter", example_inputs=(x_of(0),),
                                       quantized_base=False)
    assert all(type(p) is nn.Parameter for p in plain.parameters())
    torch.testing.assert_close(lora_fx.fold(plain)(x), lora_fx.fold(adapted, base="original")(x), atol=0, rtol=0)
    with pytest.warns(UserWarning, match=f"trained against a {kind} base"):
        lora_fx.load_adapter(plain, tmp_path / "adapter")


def test_a_malformed_quantized_base_record_is_refused(tmp_path):
    import json

    _, adapted = adapted_mlp()
    lora_fx.quantize_base(adapted, "fp8")
    lora_fx.save_adapter(adapted, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["quantized_base"].update(kind="int2", weights="up.weight")
    path.write_text(json.dumps(config))
    with pytest.raises(lora_fx.AdapterFileError, match="quantized_base.kind='int2'.*\n.*quantized_base.weights"):
        lora_fx.adapt_from_adapter(MLP(), tmp_path / "adapter", example_inputs=(x_of(0),))
    config["quantized_base"].update(kind="fp8", weights=["up.weight"], lora_init="pissa")
    path.write_text(json.dumps(config))
    with pytest.raises(lora_fx.AdapterFileError, match="quantized_base.lora_init='pissa'"):
        lora_fx.adapt_from_adapter(MLP(), tmp_path / "adapter", example_inputs=(x_of(0),))
    config["quantized_base"].update(lora_init="loftq", fold="original")
    path.write_text(json.dumps(config))
    with pytest.raises(lora_fx.AdapterFileError, match="dequantized weights only"):
        lora_fx.adapt_from_adapter(MLP(), tmp_path / "adapter", example_inputs=(x_of(0),))
    del config["quantized_base"]["lora_init"]  # files written before LoftQ have none
    config["quantized_base"].update(fold=None, weights=["up.weight", "nowhere.weight"])
    path.write_text(json.dumps(config))
    model = MLP()
    with pytest.raises(lora_fx.AdapterFileError, match="nowhere.weight.*no linear call") as error:
        lora_fx.adapt_from_adapter(model, tmp_path / "adapter", example_inputs=(x_of(0),))
    assert "quantized_base=False" in error.value.fix
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())  # as it was


@pytest.mark.parametrize("lora_compute, dtype", [("auto", torch.bfloat16), ("adapter", torch.float32)])
def test_fp8_runs_the_lora_branches_in_the_base_dtype_with_fp32_master_weights(lora_compute, dtype):
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    adapted = lora_fx.adapt(model, Rule(name="up|down", r=4), example_inputs=(x_of(0).bfloat16(),))
    lora_fx.quantize_base(adapted, "fp8", lora_compute=lora_compute)
    branch = adapted.lora_fx["up"]
    with torch.no_grad():
        branch.lora_B.normal_()
    saved = []  # what the branch's matmuls keep for backward: their operands, in the dtype they multiply in
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = branch(x_of(1).bfloat16())
    assert set(saved) == {dtype} and out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert branch.lora_A.dtype == branch.lora_A.grad.dtype == torch.float32  # the optimizer updates fp32 weights
    assert branch.lora_A.grad.abs().sum() > 0
    losses = train(adapted, dtype=torch.bfloat16)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow
@needs_torchao
@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_a_quantized_llama_trains_generates_checkpoints_and_exports_like_its_base(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    base_path = tmp_path / "base.onnx"
    lora_fx.export_onnx(model, base_path, example_inputs=(ids,))
    adapted = lora_fx.adapt(model, Rule(name=r".*_proj", r=4), example_inputs=(ids,))
    report = lora_fx.quantize_base(adapted, kind)
    assert len(report.quantized) == 14  # 7 linears in each of 2 layers
    view = lora_fx.checkpoint_layers(adapted)  # made after quantize_base: its layers read the quantized weights
    adapted.train()
    torch.testing.assert_close(view(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    train_lm(adapted, adapted, ids)
    adapted.eval()
    # generate's calls (a KV cache) are new call kinds: captured now, reading the quantized weights
    tokens = adapted.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True)
    merged = lora_fx.fold(adapted, base="dequantized")
    if kind == "nf4":
        assert torch.equal(merged.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True), tokens)
    merged_path = tmp_path / "merged.onnx"
    lora_fx.export_onnx(merged, merged_path, example_inputs=(ids,))
    assert lora_fx.verify_onnx(base_path, merged_path).identical


def test_quantize_base_refuses_what_it_cannot_do_and_changes_nothing(tmp_path):
    model, adapted = adapted_mlp()
    weights = {n: p for n, p in model.named_parameters()}
    with pytest.raises(InputError, match="unknown kind"):
        lora_fx.quantize_base(adapted, "int3")
    with pytest.raises(InputError, match="which"):
        lora_fx.quantize_base(adapted, "fp8", which="some")
    for block_size in (0, -64, 3, 1000, "64", True):  # the argument is named, not the weights
        with pytest.raises(InputError, match="block_size must be a power of two"):
            lora_fx.quantize_base(adapted, "nf4", block_size=block_size)
    with pytest.raises(InputError, match="not adapted|lora_fx.adapt"):
        lora_fx.quantize_base(model, "fp8")
    assert all(p is weights[n] for n, p in model.named_parameters())
    lora_fx.quantize_base(adapted, "fp8")
    with pytest.raises(InputError, match="quantized already"):
        lora_fx.quantize_base(adapted, "fp8")
    with pytest.raises(FoldError, match="quantized"):
        lora_fx.merge_adapter(adapted)
    with pytest.raises(FoldError, match="in-place"):
        lora_fx.fold(adapted, inplace=True)
    with pytest.raises(InputError, match="fold base"):
        lora_fx.fold(adapted, base="closest")
    with pytest.raises(lora_fx.ExportError, match="lora_fx.fold"):
        lora_fx.export_onnx(adapted, tmp_path / "unmerged.onnx", example_inputs=(x_of(0),))
    assert not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="failed on the held-out inputs"):
        lora_fx.compare_folds(adapted, [torch.randn(2, 7)])
    assert lora_fx.fold(adapted, base="dequantized") is not None


def test_weights_quantize_base_leaves_as_they_are_are_named_with_the_reason():
    """Expert banks (3-D, read by grouped matmuls), convolutions and embeddings have no quantized matmul: the report
    names them among the weights left as they are, and a refusal says why and how to go on (it said
    "no weight can be quantized: {}", and "no linear call reads it" of an expert weight)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, use_cache=False)
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    experts = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]

    def mixtral(rules):
        torch.manual_seed(0)
        return lora_fx.adapt(transformers.MixtralForCausalLM(cfg).eval(), rules, example_inputs=(ids,))

    report = lora_fx.quantize_base(mixtral([Rule(role="moe.experts"), Rule(role="attn.q")]), "fp8")
    assert report.quantized == ["model.layers.0.self_attn.q_proj.weight"]
    assert all("an expert weight" in report.skipped[w] for w in experts), report.skipped
    only_experts = mixtral([Rule(role="moe.experts")])
    with pytest.raises(InputError, match=r"no weight can be quantized: \{'model.layers.0.mlp.experts") as e:
        lora_fx.quantize_base(only_experts, "fp8")
    assert "expert banks" in e.value.fix
    with pytest.raises(InputError, match="these weights cannot be quantized: .*an expert weight"):
        lora_fx.quantize_base(only_experts, "fp8", which=experts[:1])
    if _has_torchao():  # a weight NF4 cannot cut into blocks: the fix is about its size, not how it is read
        odd = lora_fx.adapt(nn.Sequential(nn.Linear(10, 6)), example_inputs=(torch.randn(2, 10),))
        with pytest.raises(InputError, match=r"has no NF4 block size") as e:
            lora_fx.quantize_base(odd, "nf4")
        assert "multiple of 8" in e.value.fix


@needs_torchao
def test_an_nf4_state_dict_into_a_model_without_an_nf4_base_is_refused_before_anything_changes():
    _, quantized = adapted_mlp(seed=1)
    lora_fx.quantize_base(quantized, "nf4")
    _, plain = adapted_mlp(seed=2)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(InputError, match=r"NF4 weights .* for \['up.weight', 'down.weight'\]") as e:
        plain.load_state_dict(quantized.state_dict())
    assert "quantize_base" in e.value.fix
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())
    lora_fx.quantize_base(plain, "nf4")  # the way the error gives
    plain.load_state_dict(quantized.state_dict())
    torch.testing.assert_close(plain(x_of(3)), quantized(x_of(3)), atol=0, rtol=0)


def test_fp8_forms_follow_the_weights_load_state_dict_writes():
    """The FP8 forms are derived from the weights and not in the state dict: a state dict loaded into a quantized
    model (its pretrained weights, a checkpoint) remakes them, or the model would compute with the old weights."""
    x = x_of(5)
    _, source = adapted_mlp(seed=0)
    lora_fx.quantize_base(source, "fp8")
    for lora in source.lora_fx.values():
        nn.init.normal_(lora.lora_B, std=0.1)
    expected = source(x).detach()
    for assign in (False, True):
        _, target = adapted_mlp(seed=1)
        lora_fx.quantize_base(target, "fp8")
        assert rel(target(x), expected) > 0.1
        target.load_state_dict(source.state_dict(), assign=assign)
        assert torch.equal(target(x), expected)  # the same weights give the same forms, bit for bit
        torch.testing.assert_close(lora_fx.fold(target, base="dequantized")(x), lora_fx.fold(source)(x))
    copied = copy.deepcopy(target)  # the hook goes with the copy and remakes the copy's forms only
    _, other = adapted_mlp(seed=2)
    copied.load_state_dict(other.state_dict(), strict=False)
    assert torch.equal(target(x), expected) and rel(copied(x), expected) > 0.1


@needs_torchao
def test_nf4_original_fold_follows_the_weights_load_state_dict_writes():
    """torchao quantizes a loaded weight into the NF4 tensor; the kept exact W0 must follow, or fold(base="original")
    would add the LoRA to the weights from before the load (it did, silently). NF4 weights loaded from another NF4
    model carry no originals: the original fold says so."""
    from lora_fx.state import adapted_state

    x = x_of(5)
    other, source = adapted_mlp(seed=2)  # full-precision weights to load: a pretrained checkpoint
    _, target = adapted_mlp(seed=1)
    lora_fx.quantize_base(target, "nf4")
    lora_fx.compare_folds(target, [x])
    assert adapted_state(target)[1].fold_choice is not None
    target.load_state_dict(source.state_dict())
    assert lora_fx.fold(target, base="original").up.weight.equal(other.up.weight)  # B = 0: W0 itself
    assert adapted_state(target)[1].fold_choice is None  # compare_folds measured the old weights: no verdict
    assert lora_fx.fold(target).down.weight.equal(lora_fx.fold(target, base="dequantized").down.weight)
    _, quantized = adapted_mlp(seed=3)
    lora_fx.quantize_base(quantized, "nf4")
    target.load_state_dict(quantized.state_dict())
    with pytest.raises(FoldError, match=r"load_state_dict loaded them quantized \(NF4\)"):
        lora_fx.fold(target, base="original")
    torch.testing.assert_close(lora_fx.fold(target, base="dequantized")(x), quantized(x), atol=1e-6, rtol=1e-6)


def test_a_layer_view_made_before_quantize_base_runs_the_quantized_model():
    """A view splits the adapted model's graph as it is: made before quantize_base, its calls go to a split of the
    rewritten graph (it failed on NF4 weights, and computed with the unquantized ones under FP8)."""
    from test_split_layers import _blocks

    for kind in ("nf4", "fp8") if _has_torchao() else ("fp8",):
        adapted, x = _blocks()
        view = lora_fx.checkpoint_layers(adapted)
        lora_fx.quantize_base(adapted, kind, which="all")
        adapted.train()
        for lora in adapted.lora_fx.values():
            nn.init.normal_(lora.lora_B, std=0.1)
        out = view(x)
        torch.testing.assert_close(out, adapted(x), atol=1e-6, rtol=1e-6)
        out.pow(2).mean().backward()
        assert all(p.grad is not None for p in lora_fx.trainable_parameters(adapted))


def test_the_original_fold_needs_the_original_weights():
    """FP8 leaves each weight in place beside its FP8 forms: it is W0, no copy is made. NF4 replaces it: the
    original fold needs the CPU copy keep_original makes, and says so without it."""
    from lora_fx.state import adapted_state

    model, adapted = adapted_mlp()
    w0 = model.up.weight.detach().clone()
    lora_fx.quantize_base(adapted, "fp8")
    assert all(r.original is None for r in adapted_state(adapted)[1].quantized.values())  # no host copy
    with torch.no_grad():
        adapted.lora_fx["up"].lora_B.normal_()
    lora = adapted.lora_fx["up"]
    expected = w0 + lora.scaling * (lora.lora_B.detach() @ lora.lora_A.detach())
    torch.testing.assert_close(lora_fx.fold(adapted, base="original").up.weight, expected, atol=1e-6, rtol=0)
    if not _has_torchao():
        return
    _, adapted = adapted_mlp()
    lora_fx.quantize_base(adapted, "nf4", keep_original=False)
    with pytest.raises(FoldError, match="keep_original"):
        lora_fx.fold(adapted, base="original")
    assert lora_fx.compare_folds(adapted, [x_of(1)]).rel_l2.keys() == {"dequantized"}


@pytest.mark.parametrize("kind", KINDS)
def test_loftq_starts_the_lora_at_the_quantization_error_and_folds_only_into_the_dequantized_weights(kind, tmp_path):
    """lora_init='loftq': s·B·A is the best rank-r approximation of W0 - dequant(Q(W0)) (Eckart-Young: what is
    left is exactly the energy of the other singular values), so the model starts closer to W0 than QLoRA's B = 0
    does; after training the dequantized fold is the trained model, the original fold is refused (it would add the
    error twice), and an adapter file rebuilds the same model and keeps that refusal."""
    import copy

    model, plain = adapted_mlp()
    x = x_of(99)
    before = model(x).detach()
    pristine = copy.deepcopy(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_fx.quantize_base(plain, kind)
    qlora_error = rel(plain(x), before)

    _, adapted = adapted_mlp()
    report = lora_fx.quantize_base(adapted, kind, lora_init="loftq")
    assert set(report.error_removed) == {"up.weight", "down.weight"} and "LoftQ" in str(report)
    for name in ("up", "down"):
        lora = adapted.lora_fx[name]
        dequantized = lora_fx.fold(adapted, base="dequantized").get_parameter(f"{name}.weight").detach().double() - \
            lora.scaling * (lora.lora_B.detach().double() @ lora.lora_A.detach().double())
        error = w0[f"{name}.weight"].double() - dequantized
        S = torch.linalg.svdvals(error)
        left = error - lora.scaling * (lora.lora_B.detach().double() @ lora.lora_A.detach().double())
        torch.testing.assert_close(left.pow(2).sum(), S[lora.r:].pow(2).sum(), rtol=1e-4, atol=0)
        optimum = float(1 - S[lora.r:].pow(2).sum() / S.pow(2).sum())
        assert report.error_removed[f"{name}.weight"] == pytest.approx(optimum, rel=1e-4)
    if kind == "nf4":  # the model starts closer to the original than B = 0 does (FP8's error is mostly the
        assert rel(adapted(x), before) < 0.97 * qlora_error  # activations' own rounding: weights checked above)

    losses = train(adapted)
    assert losses[-1] < 0.8 * losses[0]
    adapted.eval()
    with pytest.raises(FoldError, match="twice"):
        lora_fx.fold(adapted, base="original")
    comparison = lora_fx.compare_folds(adapted, [x_of(100 + i) for i in range(2)])
    assert set(comparison.rel_l2) == {"dequantized"}
    merged = lora_fx.fold(adapted)
    if kind == "nf4":
        torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-5)
    else:  # FP8 also quantizes the activations
        assert rel(merged(x), adapted(x)) < 0.05

    lora_fx.save_adapter(adapted, tmp_path / "adapter")
    with pytest.warns(UserWarning, match=f"trained against a {kind} base.*twice over"):  # PEFT has no field for it
        lora_fx.save_peft_adapter(adapted, tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    rebuilt = lora_fx.adapt_from_adapter(pristine, tmp_path / "adapter", example_inputs=(x_of(0),))
    torch.testing.assert_close(rebuilt(x), adapted(x), atol=0, rtol=0)
    torch.testing.assert_close(lora_fx.fold(rebuilt)(x), merged(x), atol=0, rtol=0)
    with pytest.raises(FoldError, match="twice"):
        lora_fx.fold(rebuilt, base="original")
    _, loaded = adapted_mlp()  # load_adapter onto the same quantized base, made with the default lora_init
    lora_fx.quantize_base(loaded, kind)
    lora_fx.load_adapter(loaded, tmp_path / "adapter")
    torch.testing.assert_close(loaded(x), adapted(x), atol=0, rtol=0)
    with pytest.raises(FoldError, match="twice"):
        lora_fx.fold(loaded, base="original")
    plain, _ = adapted_mlp()  # a plain base on purpose: allowed, but it adds the error again, and says so
    with pytest.warns(UserWarning, match="lora_init='loftq'.*adds that error again"):
        lora_fx.adapt_from_adapter(plain, tmp_path / "adapter", example_inputs=(x_of(0),), quantized_base=False)


class PackedQKV(nn.Module):
    """One Linear makes q, k and v (chunked), as many attention implementations do."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (t.view(b, n, 4, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def test_loftq_gives_each_slice_of_a_packed_weight_its_own_rows_of_the_error():
    """LoRA on the q and v rows of a packed qkv weight: each slice's LoRA starts at the rank-r approximation of the
    error in its own rows (Eckart-Young again); k's rows keep their quantization error."""
    torch.manual_seed(0)
    model = PackedQKV()
    w0 = model.qkv.weight.detach().clone()
    x = torch.randn(2, 5, 32)
    adapted = lora_fx.adapt(model, Rule(role=["attn.q", "attn.v"], r=4), example_inputs=(x,))
    report = lora_fx.quantize_base(adapted, "fp8", lora_init="loftq")
    slices = [lora for lora in adapted.lora_fx.values() if lora.weight_name == "qkv.weight"]
    assert sorted(lora.rows for lora in slices) == [((0, 32),), ((64, 96),)]
    assert len(report.error_removed) == 2 and all("rows" in key for key in report.error_removed)
    dequantized = adapted.lora_fx_base[adapted_key(adapted, "qkv.weight")].dequantize(torch.float64)
    error = w0.double() - dequantized
    for lora in slices:
        rows = error[lora.row_index]
        left = rows - lora.scaling * (lora.lora_B.detach().double() @ lora.lora_A.detach().double())
        S = torch.linalg.svdvals(rows)
        torch.testing.assert_close(left.pow(2).sum(), S[lora.r:].pow(2).sum(), rtol=1e-4, atol=0)
    merged = lora_fx.fold(adapted).qkv.weight.detach().double()
    torch.testing.assert_close(merged[32:64], dequantized[32:64].float().double(), atol=1e-6, rtol=0)  # k as quantized


def adapted_key(adapted, weight: str) -> str:
    from lora_fx.state import adapted_state

    return adapted_state(adapted)[1].quantized[weight].key


def test_loftq_needs_untrained_loras_and_leaves_the_model_as_it_was_when_refused():
    model, adapted = adapted_mlp()
    with torch.no_grad():
        adapted.lora_fx["down"].lora_B.normal_()
    A = adapted.lora_fx["up"].lora_A.detach().clone()
    with pytest.raises(InputError, match="B is not zero") as error:
        lora_fx.quantize_base(adapted, "fp8", lora_init="loftq")
    assert error.value.where == "down.weight" and "right after adapt" in error.value.fix
    assert torch.equal(adapted.lora_fx["up"].lora_A, A) and not hasattr(adapted, "lora_fx_base")
    assert all(type(p) is nn.Parameter for p in model.parameters())
    with pytest.raises(InputError, match="unknown lora_init"):
        lora_fx.quantize_base(adapted, "fp8", lora_init="pissa")
    _, adapted = adapted_mlp()
    with pytest.raises(InputError, match="no LoRA"):
        lora_fx.quantize_base(adapted, "fp8", which=["head.weight"], lora_init="loftq")


def test_loftq_factors_of_large_matrices_come_from_a_randomized_svd_as_good_as_the_full_one(monkeypatch):
    """Above FULL_SVD_MAX_ELEMENTS the SVD is randomized (seconds saved per 8B-model matrix): on a matrix with a
    decaying spectrum it finds the top directions as well as the full SVD (share within 1e-3), deterministically,
    without moving the user's random stream."""
    from lora_fx import loftq

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 200, generator=g))
    V, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    residual = (U * (0.9 ** torch.arange(200.0))) @ V.T
    full = loftq.rank_r_share(residual, *loftq.low_rank_factors(residual, 8, 2.0), 2.0)
    monkeypatch.setattr(loftq, "FULL_SVD_MAX_ELEMENTS", 1000)
    state = torch.random.get_rng_state()
    A, B = loftq.low_rank_factors(residual, 8, 2.0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(loftq.low_rank_factors(residual, 8, 2.0)[0], A)
    assert A.shape == (8, 200) and B.shape == (300, 8)
    assert loftq.rank_r_share(residual, A, B, 2.0) == pytest.approx(full, abs=1e-3) and full > 0.5


def test_nf4_without_torchao_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without torchao gives: ImportError
    model, adapted = adapted_mlp()
    with pytest.raises(InputError, match=r"lora-fx\[quant\]"):
        lora_fx.quantize_base(adapted, "nf4")
    assert all(type(p) is nn.Parameter for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 kernels need an Ada or Hopper GPU")
def test_fp8_kernel_matches_its_reference_on_the_gpu():
    from lora_fx import fp8

    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(37, 512, device="cuda", dtype=torch.bfloat16)  # 37 rows: the kernel pads to 16
    x8, xs = fp8.rowwise(x)
    w8, ws = fp8.rowwise(w)
    kernel = fp8.scaled_mm(x8, xs, w8, ws, torch.bfloat16)
    reference = fp8.reference_mm(x8, xs, w8, ws, torch.bfloat16)
    assert rel(kernel.float(), reference.float()) < 1e-2  # bf16 output rounding


class LinearAndSharedMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 32)
        self.w = nn.Parameter(torch.randn(32, 16) * 0.1)  # read by a matmul and by a sum: not only a linear call

    def forward(self, x):
        return self.proj(x) @ self.w + self.w.sum()


@pytest.mark.parametrize("kind", KINDS)
def test_weights_read_other_than_by_a_linear_call_stay_as_they_are_with_the_reason(kind):
    torch.manual_seed(0)
    model = LinearAndSharedMatmul()
    adapted = lora_fx.adapt(model, Rule(name="proj", r=4), example_inputs=(x_of(0),))
    w = model.w
    report = lora_fx.quantize_base(adapted, kind, which="all")
    assert report.quantized == ["proj.weight"]
    assert "also read by" in report.skipped["w"]
    assert model.w is w  # untouched
    assert "w" in str(report)
    x = x_of(1)
    torch.testing.assert_close(lora_fx.fold(adapted)(x), adapted.eval()(x), atol=5e-2, rtol=0)


class Conv1D(nn.Module):
    """GPT-2's Conv1D (transformers.pytorch_utils.Conv1D): addmm(bias, x, W) with W stored (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.05)
        self.bias = nn.Parameter(torch.randn(nf) * 0.05)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.weight.size(-1),))


class InOutWeights(nn.Module):
    """Weights stored (in, out): a Conv1D, and a bare x @ W."""

    def __init__(self):
        super().__init__()
        self.up = Conv1D(128, 64)
        self.w = nn.Parameter(torch.randn(128, 64) * 0.05)

    def forward(self, x):
        return torch.relu(self.up(x)) @ self.w


class InOutLinears(nn.Module):
    """InOutWeights written with nn.Linear: the same function, its weights stored (out, in)."""

    def __init__(self, twin: InOutWeights):
        super().__init__()
        self.up, self.w = nn.Linear(64, 128), nn.Linear(128, 64, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(twin.up.weight.T)
            self.up.bias.copy_(twin.up.bias)
            self.w.weight.copy_(twin.w.T)

    def forward(self, x):
        return self.w(torch.relu(self.up(x)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_weights_stored_in_out_run_quantized_and_fold_to_the_traced_graph(kind, frontend):
    """GPT-2's Conv1D and x @ W keep their weight (in, out): the quantized matmul multiplies by it untransposed (its
    input gradient by its transpose), training works, and both folds give back the traced graph in that layout."""
    torch.manual_seed(0)
    model = InOutWeights()
    x = x_of(3)
    before = model(x).detach()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = lora_fx.adapt(model, Rule(r=4), example_inputs=(x_of(0),), frontend=frontend)
    report = lora_fx.quantize_base(adapted, kind)
    assert sorted(report.quantized) == ["up.weight", "w"] and not report.skipped
    assert lora_fx.graph(adapted).code.count("lora_fx_base") == 2
    assert tuple(model.up.weight.shape) == (64, 128)  # the weight keeps its shape (NF4: its NF4 form)
    assert 0.001 < rel(adapted(x), before) < 0.2  # the quantization error is there, and bounded

    # NF4: the quantized model is the model with the dequantized weights; FP8 (which also scales activations and
    # gradients per row) is the same model written with nn.Linear on the transposed weights, quantized the same way
    reference = InOutLinears(model) if kind == "fp8" else copy.deepcopy(InOutWeights())
    if kind == "fp8":
        lora_fx.quantize_base(reference := lora_fx.adapt(reference, Rule(r=4), example_inputs=(x_of(0),)), kind)
    else:
        with torch.no_grad():
            state = adapted.__dict__[lora_fx.state.STATE_KEY]
            for name in ("up.weight", "w"):
                reference.get_parameter(name).copy_(lora_fx.quantize.base_weight(adapted, state, name, "dequantized"))
            reference.up.bias.copy_(original["up.bias"])
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(adapted(xg), reference(xr), atol=1e-5, rtol=1e-5)
    adapted(xg).pow(2).sum().backward()
    reference(xr).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-5, rtol=1e-5)
    tolerance = 1e-5 if kind == "nf4" else 0.05  # FP8 also quantizes the activations

    losses = train(adapted)
    assert losses[-1] < 0.8 * losses[0]
    adapted.eval()
    merged = lora_fx.fold(adapted, base="dequantized")
    assert type(merged) is InOutWeights and tuple(merged.up.weight.shape) == (64, 128)
    assert rel(merged(x), adapted(x)) < tolerance
    merged_original = lora_fx.fold(adapted, base="original")
    lora = lora_fx.lora_state_dict(adapted)
    key = next(k for k in lora if k.endswith("up.lora_A"))
    delta = (lora[key.replace("lora_A", "lora_B")].double() @ lora[key].double()) * (4 / 4)  # alpha/r with the
    #                                                                                          defaults of Rule(r=4)
    scaling = adapted.lora_fx["up"].scaling
    torch.testing.assert_close(merged_original.up.weight.double(),
                               original["up.weight"].double() + scaling / (4 / 4) * delta.T, atol=1e-6, rtol=0)


@pytest.mark.slow
@needs_torchao
@pytest.mark.parametrize("kind, lora_init", [("nf4", "keep"), ("nf4", "loftq"), ("fp8", "keep")])
def test_a_quantized_gpt2_trains_generates_redeploys_and_exports_like_its_base(kind, lora_init, tmp_path):
    """GPT-2's Conv1D weights are stored (in, out): all of them run quantized, and the rest of the workflow (train,
    generate, adapter file onto a fresh model, fold, ONNX) is that of any other model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, bos_token_id=1,
                                  eos_token_id=2, use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    pristine = copy.deepcopy(model)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    lora_fx.export_onnx(model, tmp_path / "base.onnx", example_inputs=(ids,))
    adapted = lora_fx.adapt(model, example_inputs=(ids,))  # the default rules: every Conv1D
    report = lora_fx.quantize_base(adapted, kind, lora_init=lora_init)
    assert len(report.quantized) == 8 and not report.skipped  # c_attn, c_proj, c_fc, mlp.c_proj in 2 layers
    adapted.train()
    losses = train_lm(lora_fx.checkpoint_layers(adapted), adapted, ids)  # labels through the view: its loss
    assert losses[-1] < losses[0]
    adapted.eval()
    tokens = adapted.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)

    lora_fx.save_adapter(adapted, tmp_path / "adapter")
    rebuilt = lora_fx.adapt_from_adapter(pristine, tmp_path / "adapter", example_inputs=(ids,))
    torch.testing.assert_close(rebuilt(ids).logits, adapted(ids).logits, atol=0, rtol=0)

    merged = lora_fx.fold(adapted)
    if kind == "nf4":  # the dequantized fold is the trained function (FP8 also quantized the activations)
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(merged.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True,
                                           pad_token_id=0), tokens)
    assert all(p.shape == q.shape for p, q in zip(merged.parameters(), pristine.parameters()))
    lora_fx.export_onnx(merged, tmp_path / "merged.onnx", example_inputs=(ids,))
    assert lora_fx.verify_onnx(tmp_path / "base.onnx", tmp_path / "merged.onnx").identical


@pytest.mark.parametrize("kind", KINDS)
def test_loftq_on_weights_stored_in_out_takes_the_error_in_the_loras_layout(kind):
    """The LoRA's B·A is (out, in); a Conv1D's error is (in, out): LoftQ factors its transpose."""
    torch.manual_seed(0)
    model = InOutWeights()
    adapted = lora_fx.adapt(model, Rule(r=4), example_inputs=(x_of(0),))
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = lora_fx.quantize_base(adapted, kind, lora_init="loftq")
    state = adapted.__dict__[lora_fx.state.STATE_KEY]
    for name in ("up.weight", "w"):
        error = (original[name] - lora_fx.quantize.base_weight(adapted, state, name, "dequantized")).double().T
        tail = torch.linalg.svdvals(error)[4:].pow(2).sum() / error.pow(2).sum()
        assert report.error_removed[name] == pytest.approx(1 - float(tail), rel=1e-4)
    # the merged model starts at the original weights plus what rank 4 cannot hold
    merged = lora_fx.fold(adapted)
    for name in ("up.weight", "w"):
        assert rel(merged.get_parameter(name), original[name]) < rel(
            lora_fx.quantize.base_weight(adapted, state, name, "dequantized"), original[name])


class TransposedLinears(nn.Module):
    """Falcon's FalconLinear: input @ self.weight.T (+ bias), an nn.Linear subclass that never calls F.linear."""

    class Layer(nn.Linear):
        def forward(self, x):
            return x @ self.weight.T + self.bias

    def __init__(self):
        super().__init__()
        self.up, self.down = self.Layer(64, 128), self.Layer(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_x_at_w_transposed_runs_on_the_quantized_weight_and_folds_to_the_traced_graph(kind, frontend):
    """x @ W.T is linear(x, W): quantize_base rewrites it to the quantized matmul (the transpose node reads nothing
    meanwhile), training works, and fold gives back the traced graph with the dequantized fold."""
    torch.manual_seed(0)
    model = TransposedLinears()
    x = x_of(3)
    before = model(x).detach()
    adapted = lora_fx.adapt(model, Rule(r=4), example_inputs=(x_of(0),), frontend=frontend)
    report = lora_fx.quantize_base(adapted, kind)
    assert sorted(report.quantized) == ["down.weight", "up.weight"] and not report.skipped
    assert lora_fx.graph(adapted).code.count("lora_fx_base") == 2
    assert 0.001 < rel(adapted(x), before) < 0.2  # the quantization error is there, and bounded
    losses = train(adapted)
    assert losses[-1] < 0.8 * losses[0]
    adapted.eval()
    merged = lora_fx.fold(adapted, base="dequantized")
    assert type(merged) is TransposedLinears
    tolerance = 1e-5 if kind == "nf4" else 0.05  # FP8 also quantizes the activations
    assert rel(merged(x), adapted(x)) < tolerance


@pytest.mark.slow
@needs_torchao
def test_a_qlora_model_trains_in_transformers_trainer_with_gradient_checkpointing(tmp_path):
    """The user's workflow: quantize_base, then transformers' Trainer(gradient_checkpointing=True), save_pretrained,
    fold to the user's class, generate."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, use_cache=False,
                                   pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(3, 100, (16, 12), generator=torch.Generator().manual_seed(0))
    adapted = lora_fx.adapt(model, Rule(name=r".*_proj", r=8), example_inputs=(ids[:1],))
    lora_fx.quantize_base(adapted, "nf4")
    args = transformers.TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                                          learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, gradient_checkpointing=True)
    trainer = transformers.Trainer(model=adapted, args=args,
                                   train_dataset=[{"input_ids": row, "labels": row} for row in ids])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and sum(losses[4:]) < sum(losses[:4])  # the second epoch fits better than the first
    adapted.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    merged = lora_fx.fold(adapted)
    assert type(merged) is transformers.LlamaForCausalLM
    assert merged.generate(ids[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


class WideBlocks(nn.Module):
    """Residual blocks wide enough for torchao's NF4 sharding: each weight's blocks and block scales split evenly
    across 2 ranks (256 x 256: 1024 blocks of 64, 4 groups of 256 scales)."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(width, width)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _wide(kind: str):
    torch.manual_seed(0)
    adapted = lora_fx.adapt(WideBlocks(), Rule(r=2, alpha=4), example_inputs=(torch.randn(4, 256),),
                            frontend="export")
    lora_fx.quantize_base(adapted, kind)
    return adapted


def _fsdp2_quantized_worker(rank: int, world: int, init_file: str, out: str, kind: str = "nf4") -> None:
    import json

    from torch.distributed.fsdp import fully_shard

    from conftest import gloo_rank, sharded_and_reference_lora

    with gloo_rank(rank, world, init_file):
        adapted, reference = _wide(kind), _wide(kind)  # reference: one process, every rank's batch
        view = lora_fx.split_layers(adapted)
        for parts in view.layer_modules.values():
            for part in parts:
                fully_shard(part)
        fully_shard(view)
        g = [torch.Generator().manual_seed(100 + r) for r in range(world)]
        batches = [(torch.randn(16, 256, generator=g[r]), torch.randn(16, 256, generator=g[r])) for r in range(world)]
        error = sharded_and_reference_lora(view, adapted, reference, batches, rank, steps=3)
        ref = lora_fx.lora_state_dict(reference)
        moved = max(v.abs().max().item() for k, v in ref.items() if "lora_B" in k)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"error": error, "moved": moved}, f)


@pytest.mark.slow  # two processes: about 20 s on 2 cores
@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_base_trains_under_fsdp2_per_layer(kind, tmp_path):
    """split_layers + fully_shard on every layer part of a quantized model (NF4 weights are sharded with torchao's
    NF4 all-gather; FP8 forms are buffers, whole on each rank): 3 steps on 2 gloo processes give the LoRA weights
    one process gives on both batches. Tolerance 1e-5: the same fp32 math, reduced across ranks in another order."""
    import functools

    from conftest import spawn_fsdp2

    _, results = spawn_fsdp2(functools.partial(_fsdp2_quantized_worker, kind=kind), tmp_path)
    for r in results:
        assert r["moved"] > 0 and r["error"] <= 1e-5, r

