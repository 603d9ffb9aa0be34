"""The model catalogue: tiny models for the coverage matrix (2 layers, hidden 32-64, random weights, built offline).

Every builder returns ``(model, example_args, example_kwargs)`` with the model in eval mode and seeded weights.
``ZOO`` lists them as ``Entry`` records: the front ends that apply, whether the model is slow, whether its first
output is an LM's logits (loss: cross-entropy) or anything else (loss: MSE to a fixed random target), and how to
make inputs of another batch / sequence size (for the dynamic-shape checks).

transformers models are built from configs (no download); timm builders skip cleanly when timm is not installed
(``pytest.importorskip``). The steps run on each entry live in ``zoo.harness``.
"""

from __future__ import annotations


from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lora_fx.rules import Rule

BATCH, SEQ = 2, 8  # example input sizes; the dynamic-shape checks use OTHER_BATCH, OTHER_SEQ
OTHER_BATCH, OTHER_SEQ = 3, 5
VOCAB, HIDDEN, HEADS, LAYERS = 128, 32, 2, 2
IMAGE = 32  # image side for the vision models (patch 8 -> 16 patches)


def _importorskip(name: str):
    """pytest.importorskip when running under pytest, a plain ImportError otherwise (benchmarks/coverage.py)."""
    try:
        import pytest
    except ImportError:  # pragma: no cover
        return __import__(name)
    return pytest.importorskip(name)


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def random_ids(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def random_images(batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=g)


def random_tokens(batch: int = BATCH, seq: int = SEQ, dim: int = HIDDEN, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, dim, generator=g)


# ------------------------------------------------------------------------------------------------ transformers
def _hf(config_cls: str, model_cls: str, attn: str | None, **config):
    transformers = _importorskip("transformers")
    _seeded()
    cfg = getattr(transformers, config_cls)(**config)
    if attn is not None:
        cfg._attn_implementation = attn  # the documented attn_implementation=... of from_pretrained/from_config
    model = getattr(transformers, model_cls)(cfg)
    return model.eval()


def _ids_mask(batch: int = BATCH, seq: int = SEQ):
    # input_ids positionally, the attention mask as a keyword input (both paths are exercised)
    return (random_ids(batch, seq),), {"attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def gpt2(attn: str = "sdpa", tie: bool = False, batch: int = BATCH, seq: int = SEQ):
    model = _hf("GPT2Config", "GPT2LMHeadModel", attn, vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN,
                n_layer=LAYERS, n_head=HEADS, use_cache=False, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return (model, *_ids_mask(batch, seq))


def bert(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ):
    model = _hf("BertConfig", "BertModel", attn, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, intermediate_size=2 * HIDDEN, max_position_embeddings=64)
    return (model, *_ids_mask(batch, seq))


def roberta(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ):
    model = _hf("RobertaConfig", "RobertaModel", attn, vocab_size=VOCAB, hidden_size=HIDDEN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                max_position_embeddings=72, pad_token_id=1)
    return (model, *_ids_mask(batch, seq))


def deberta_v2(attn: str = "eager", batch: int = BATCH, seq: int = SEQ):
    # DeBERTa-v2 has one attention implementation (its own; no sdpa). With relative attention and
    # pos_att_type c2p|p2c its query/key projections are reused for the relative positions: several call sites.
    model = _hf("DebertaV2Config", "DebertaV2Model", None, vocab_size=VOCAB, hidden_size=HIDDEN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                max_position_embeddings=64, relative_attention=True, position_buckets=16,
                pos_att_type=["p2c", "c2p"], max_relative_positions=-1, share_att_key=True)
    return (model, *_ids_mask(batch, seq))


def _decoder(config_cls: str, model_cls: str, attn: str, batch: int, seq: int, **extra):
    model = _hf(config_cls, model_cls, attn, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=1,
                max_position_embeddings=64, use_cache=False, tie_word_embeddings=False, **extra)
    return (model, *_ids_mask(batch, seq))


def llama(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ):
    return _decoder("LlamaConfig", "LlamaForCausalLM", attn, batch, seq)


def mistral(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ):
    return _decoder("MistralConfig", "MistralForCausalLM", attn, batch, seq, sliding_window=None)


def qwen2(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ):
    return _decoder("Qwen2Config", "Qwen2ForCausalLM", attn, batch, seq)


def t5(attn: str = "eager", batch: int = BATCH, seq: int = SEQ):
    model = _hf("T5Config", "T5ForConditionalGeneration", attn, vocab_size=VOCAB, d_model=HIDDEN, d_kv=16,
                d_ff=2 * HIDDEN, num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=HEADS,
                relative_attention_num_buckets=8, dropout_rate=0.0, use_cache=False, tie_word_embeddings=False,
                decoder_start_token_id=0, pad_token_id=0)
    ids = random_ids(batch, seq)
    return model, (ids,), {"attention_mask": torch.ones(batch, seq, dtype=torch.long),
                           "decoder_input_ids": random_ids(batch, seq, seed=2)}


def vit(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ):
    model = _hf("ViTConfig", "ViTForImageClassification", attn, image_size=IMAGE, patch_size=8,
                hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=2 * HIDDEN, num_labels=10)
    return model, (random_images(batch),), {}


# sequence classifiers with a few labels: the head is narrower than the default r=8, so rules=None caps its r
def bert_cls(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ, labels: int = 2):
    model = _hf("BertConfig", "BertForSequenceClassification", attn, vocab_size=VOCAB, hidden_size=HIDDEN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                max_position_embeddings=64, num_labels=labels)
    return (model, *_ids_mask(batch, seq))


def distilbert_cls(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ, labels: int = 3):
    model = _hf("DistilBertConfig", "DistilBertForSequenceClassification", attn, vocab_size=VOCAB, dim=HIDDEN,
                n_layers=LAYERS, n_heads=HEADS, hidden_dim=2 * HIDDEN, max_position_embeddings=64, num_labels=labels)
    return (model, *_ids_mask(batch, seq))


def electra_cls(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ, labels: int = 5):
    model = _hf("ElectraConfig", "ElectraForSequenceClassification", attn, vocab_size=VOCAB, embedding_size=HIDDEN,
                hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=2 * HIDDEN, max_position_embeddings=64, num_labels=labels)
    return (model, *_ids_mask(batch, seq))


def albert_cls(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ, labels: int = 4):
    # ALBERT shares one layer's weights across its layers: every weight has LAYERS call sites
    model = _hf("AlbertConfig", "AlbertForSequenceClassification", attn, vocab_size=VOCAB, embedding_size=16,
                hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=2 * HIDDEN, max_position_embeddings=64, num_labels=labels)
    return (model, *_ids_mask(batch, seq))


# ------------------------------------------------------------------------------------------------ timm
def _timm(builder: Callable[[object], nn.Module], batch: int):
    timm = _importorskip("timm")
    _seeded()
    return builder(timm).eval(), (random_images(batch),), {}


def timm_vit(batch: int = BATCH, seq: int = SEQ):
    return _timm(lambda timm: timm.models.vision_transformer.VisionTransformer(
        img_size=IMAGE, patch_size=8, embed_dim=HIDDEN, depth=LAYERS, num_heads=HEADS, mlp_ratio=2.0,
        num_classes=10), batch)


def timm_convnext(batch: int = BATCH, seq: int = SEQ):
    return _timm(lambda timm: timm.create_model("convnext_atto", pretrained=False, num_classes=10), batch)


def timm_resnet18(batch: int = BATCH, seq: int = SEQ):
    return _timm(lambda timm: timm.create_model("resnet18", pretrained=False, num_classes=10), batch)


def timm_resnet18_3cls(batch: int = BATCH, seq: int = SEQ):
    return _timm(lambda timm: timm.create_model("resnet18", pretrained=False, num_classes=3), batch)


def timm_efficientnet(batch: int = BATCH, seq: int = SEQ):
    return _timm(lambda timm: timm.create_model("efficientnet_b0", pretrained=False, num_classes=10), batch)


def timm_mixer(batch: int = BATCH, seq: int = SEQ):
    return _timm(lambda timm: timm.models.mlp_mixer.MlpMixer(
        num_classes=10, img_size=IMAGE, patch_size=8, num_blocks=LAYERS, embed_dim=HIDDEN), batch)


# ------------------------------------------------------------------------------------------------ plain torch
def transformer_encoder(batch: int = BATCH, seq: int = SEQ):
    """nn.TransformerEncoder at top level (symbolic tracing fails on its fast-path control flow)."""
    _seeded()
    layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=2 * HIDDEN, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
    return model.eval(), (random_tokens(batch, seq),), {}


def transformer_decoder(batch: int = BATCH, seq: int = SEQ):
    """nn.TransformerDecoder: self-attention and cross-attention (in_proj_weight split into q and kv rows)."""
    _seeded()
    layer = nn.TransformerDecoderLayer(HIDDEN, HEADS, dim_feedforward=2 * HIDDEN, dropout=0.0, batch_first=True)
    model = nn.TransformerDecoder(layer, LAYERS)
    return model.eval(), (random_tokens(batch, seq), random_tokens(batch, seq + 2, seed=2)), {}


def mha(batch: int = BATCH, seq: int = SEQ):
    """nn.MultiheadAttention at top level, self-attention: packed in_proj_weight through F.linear."""
    _seeded()
    model = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
    x = random_tokens(batch, seq)
    return model.eval(), (x, x, x), {"need_weights": False}


class MHAWrapper(nn.Module):
    """nn.MultiheadAttention inside a module, with Linears around it (symbolic tracing keeps the MHA closed)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(HIDDEN, HIDDEN)
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.norm = nn.LayerNorm(HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(self.norm(h + a))


def mha_wrapped(batch: int = BATCH, seq: int = SEQ):
    _seeded()
    return MHAWrapper().eval(), (random_tokens(batch, seq),), {}


class NarrowHead(nn.Module):
    """A toy classifier whose head has 2 outputs (narrower than the default r=8)."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)).mean(1))


def narrow_head(batch: int = BATCH, seq: int = SEQ):
    _seeded()
    return NarrowHead().eval(), (random_tokens(batch, seq),), {}


class Functional(nn.Module):
    """Weights as bare parameters used through F.linear, torch.matmul and the @ operator."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(2 * HIDDEN, HIDDEN) / HIDDEN ** 0.5)  # (out, in) for F.linear
        self.b_in = nn.Parameter(torch.zeros(2 * HIDDEN))
        self.w_mid = nn.Parameter(torch.randn(2 * HIDDEN, HIDDEN) / HIDDEN ** 0.5)  # (in, out) for matmul
        self.w_out = nn.Parameter(torch.randn(HIDDEN, HIDDEN) / HIDDEN ** 0.5)  # (in, out) for @

    def forward(self, x):
        h = F.gelu(F.linear(x, self.w_in, self.b_in))
        h = torch.tanh(torch.matmul(h, self.w_mid))
        return h @ self.w_out


def functional(batch: int = BATCH, seq: int = SEQ):
    _seeded()
    return Functional().eval(), (random_tokens(batch, seq),), {}


class SharedWeight(nn.Module):
    """One nn.Linear called at two sites (as DeBERTa reuses its projections), plus one ordinary Linear."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, y):
        return self.head(torch.relu(self.proj(x)) * torch.sigmoid(self.proj(y)))


def shared_weight(batch: int = BATCH, seq: int = SEQ):
    _seeded()
    return SharedWeight().eval(), (random_tokens(batch, seq), random_tokens(batch, seq, seed=2)), {}


class ConvBN(nn.Module):
    """A small CNN with BatchNorm and a Linear classifier (like a ResNet's head): one site, and BatchNorm
    running statistics that train() would update."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def conv_bn(batch: int = BATCH, seq: int = SEQ):
    _seeded()
    return ConvBN().eval(), (random_images(batch),), {}


class TiedLM(nn.Module):
    """A tiny LM whose lm_head shares its weight tensor with the token embedding (as GPT-2 and T5 do)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.body = nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def tied_lm(batch: int = BATCH, seq: int = SEQ):
    _seeded()
    return TiedLM().eval(), (random_ids(batch, seq),), {}


def gpt2_tied(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ):
    return gpt2(attn, tie=True, batch=batch, seq=seq)


# ------------------------------------------------------------------------------------------------ mixture of experts
def _moe(family: str, impl: str, batch: int = BATCH, seq: int = SEQ):
    """A tiny Qwen3-MoE or Mixtral with 4 experts, top-2, its experts run by `impl` (transformers' grouped_mm or
    batched_mm). HF leaves the expert tensors tiny or empty at init: every expert gets its own random weights."""
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, max_position_embeddings=64, use_cache=False)
    if family == "qwen3":
        model = _hf("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "sdpa", intermediate_size=48, moe_intermediate_size=16,
                    num_experts=4, **common)
    else:
        model = _hf("MixtralConfig", "MixtralForCausalLM", "sdpa", intermediate_size=16, num_local_experts=4, **common)
    model.set_experts_implementation(impl)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.2)
    return (model.eval(), *_ids_mask(batch, seq))


def _moe_case(family: str, impl: str):
    def build(batch: int = BATCH, seq: int = SEQ):
        return _moe(family, impl, batch, seq)
    build.__name__ = f"{family}_moe_{impl}"
    return build


class LoopExperts(nn.Module):
    """Router and expert weights of LoopMoE (PEFT wraps the module that owns a targeted parameter)."""

    def __init__(self, dim: int, hidden: int, experts: int):
        super().__init__()
        self.router = nn.Parameter(torch.randn(experts, dim) * 0.5)
        self.up = nn.Parameter(torch.randn(experts, hidden, dim) * 0.3)  # (E, out, in), read by F.linear
        self.down = nn.Parameter(torch.randn(experts, hidden, dim) * 0.3)  # (E, in, out), read by x @ W[e]
        self.experts = experts

    def forward(self, x):
        probs = F.softmax(F.linear(x, self.router), dim=-1)
        top, index = torch.topk(probs, 2, dim=-1)
        out = torch.zeros_like(x)
        for e in range(self.experts):
            weight = (top * (index == e)).sum(-1, keepdim=True)
            out = out + weight * (F.silu(F.linear(x, self.up[e])) @ self.down[e])
        return out


class LoopMoE(nn.Module):
    """A model around a top-2 MoE layer written as a loop over experts (dense: every expert sees every token, weighted by its
    routing weight, zero when not chosen), so that torch.fx traces it: W[e] slices feed F.linear (up, stored
    (E, out, in)) and x @ W[e] (down, stored (E, in, out))."""

    def __init__(self, dim: int = 16, hidden: int = 24, experts: int = 4, vocab: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.moe = LoopExperts(dim, hidden, experts)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.moe(x))


def loop_moe(batch: int = BATCH, seq: int = SEQ):
    _seeded()
    return LoopMoE(vocab=VOCAB).eval(), (random_ids(batch, seq),), {}


# ------------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., tuple]  # build(batch=..., seq=...) -> (model, args, kwargs)
    frontends: tuple[str, ...]  # front ends the matrix runs ("fx", "export")
    family: str  # "transformers", "timm", "torch"
    lm: bool = False  # first output is LM logits (cross-entropy loss)
    slow: bool = False
    dynamic_seq: bool = True  # inputs have a sequence dim that may change (images do not)
    fx_fails: bool = False  # symbolic tracing is expected to fail (the matrix checks the error's hint)
    notes: str = ""
    options: dict = field(default_factory=dict)  # extra adapt() keyword arguments

    def __call__(self, batch: int = BATCH, seq: int = SEQ):
        return self.build(batch=batch, seq=seq)


def _attn(fn, attn):
    def build(batch: int = BATCH, seq: int = SEQ):
        return fn(attn, batch=batch, seq=seq)
    build.__name__ = f"{fn.__name__}_{attn}"
    return build


# transformers cases in the fast test set (one of each kind of graph: Conv1D/addmm, encoder, decoder with GQA and
# both attention implementations, vision); the others (same graphs with other names, DeBERTa, T5) are slow.
FAST_TRANSFORMERS = {"gpt2-sdpa", "bert-sdpa", "bert_cls-sdpa", "llama-sdpa", "llama-eager", "vit-sdpa"}


def _hf_entries() -> list[Entry]:
    out = []
    for fn, attns, lm in [(gpt2, ("sdpa", "eager"), True), (bert, ("sdpa", "eager"), False),
                          (bert_cls, ("sdpa",), False), (distilbert_cls, ("sdpa",), False),
                          (electra_cls, ("sdpa",), False), (albert_cls, ("sdpa",), False),
                          (roberta, ("sdpa", "eager"), False), (deberta_v2, ("eager",), False),
                          (llama, ("sdpa", "eager"), True), (mistral, ("sdpa", "eager"), True),
                          (qwen2, ("sdpa", "eager"), True), (t5, ("eager",), True), (vit, ("sdpa", "eager"), False)]:
        for attn in attns:
            slow = f"{fn.__name__}-{attn}" not in FAST_TRANSFORMERS
            options, notes = {}, ""
            if fn is t5:
                notes = ("transformers 5 ties T5's lm_head to `shared` whatever tie_word_embeddings says: rules=None "
                         "skips it (tied), hence 32 of 33 sites adapted")
            out.append(Entry(f"{fn.__name__}-{attn}", _attn(fn, attn), ("export",), "transformers", lm=lm,
                             slow=slow, dynamic_seq=fn is not vit, fx_fails=True, options=options, notes=notes))
    out.append(Entry("bert_embeddings-sdpa", _attn(bert, "sdpa"), ("export",), "transformers", fx_fails=True,
                     options={"rules": [Rule(op="embedding", r=4), Rule(role=["attn.q", "attn.v"])]},
                     notes="LoRA on the word, position and token-type embeddings (embedding kind) and on q, v"))
    return out


ZOO: list[Entry] = [
    *_hf_entries(),
    Entry("timm-vit", timm_vit, ("fx", "export"), "timm", slow=True, dynamic_seq=False),
    Entry("timm-convnext_atto", timm_convnext, ("fx", "export"), "timm", slow=True, dynamic_seq=False,
          notes="convnext_atto has conv_mlp=True: its MLPs are 1x1 Conv2d, not linear-like sites; only the head is"),
    Entry("timm-resnet18", timm_resnet18, ("fx", "export"), "timm", slow=True, dynamic_seq=False,
          notes="convolutions are not linear-like sites: only the classifier (fc) is adapted"),
    Entry("timm-resnet18_3cls", timm_resnet18_3cls, ("fx", "export"), "timm", slow=True, dynamic_seq=False,
          notes="a 3-class head: rules=None caps its r at 3"),
    Entry("timm-resnet18_convs", timm_resnet18, ("fx", "export"), "timm", slow=True, dynamic_seq=False,
          options={"rules": [Rule(op="conv", r=4), Rule(name="fc")]},
          notes="LoRA on every convolution (conv kind) and the classifier"),
    Entry("timm-efficientnet_b0_convs", timm_efficientnet, ("fx", "export"), "timm", slow=True, dynamic_seq=False,
          options={"rules": [Rule(op="conv", r=4), Rule(name="classifier")]},
          notes="depthwise convolutions (groups > 1) are left out with a warning; the pointwise ones and the stem "
                "take LoRA"),
    Entry("timm-mixer", timm_mixer, ("fx", "export"), "timm", slow=True, dynamic_seq=False),
    Entry("torch-transformer_encoder", transformer_encoder, ("export",), "torch", fx_fails=True),
    Entry("torch-transformer_decoder", transformer_decoder, ("export",), "torch", fx_fails=True,
          notes="cross-attention splits in_proj_weight into q and k|v rows before F.linear: two sites, a LoRA each"),
    Entry("torch-mha", mha, ("export",), "torch", fx_fails=True),
    Entry("torch-mha_wrapped", mha_wrapped, ("fx", "export"), "torch",
          notes="fx keeps the MultiheadAttention closed (a leaf): only inp/out are sites there"),
    Entry("torch-narrow_head", narrow_head, ("fx", "export"), "torch", notes="a 2-output head: r capped at 2"),
    Entry("torch-functional", functional, ("fx", "export"), "torch"),
    Entry("torch-shared_weight", shared_weight, ("fx", "export"), "torch"),
    Entry("torch-conv_bn", conv_bn, ("fx", "export"), "torch", dynamic_seq=False,
          notes="Conv2d is not a linear-like site: only the classifier is adapted"),
    *[Entry(f"{family}_moe-{impl}", _moe_case(family, impl), ("export",), "transformers", lm=True, slow=True,
            fx_fails=True, notes=("experts as a grouped matmul (transformers' custom op), exported through "
                                  "lora_fx's ONNX translation of it") if impl == "grouped_mm" else
            "experts as index + bmm: LoRA on both expert weights, the router left frozen")
      for family in ("qwen3", "mixtral") for impl in ("grouped_mm", "batched_mm")],
    Entry("torch-loop_moe", loop_moe, ("fx", "export"), "torch", lm=True,
          notes="a loop over experts: F.linear(x, W[e]) and x @ W[e] on 3-D parameters"),
]

# Special cases that are not part of the plain matrix (the tests look at them one by one).
EXTRAS: dict[str, Entry] = {
    e.name: e for e in [
        Entry("torch-tied_lm", tied_lm, ("fx", "export"), "torch", lm=True),
        Entry("gpt2-tied", _attn(gpt2_tied, "sdpa"), ("export",), "transformers", lm=True, fx_fails=True),
    ]
}

BY_NAME: dict[str, Entry] = {e.name: e for e in ZOO} | EXTRAS


# Bugs this matrix found (reported with a repro and a proposed fix), and the cases they make fail today.
BUGS: dict[str, str] = {}  # bug id -> what is wrong; empty: every bug this matrix found is fixed
KNOWN_BUGS: dict[str, str] = {}  # "fx:<case>" (adapt/train/fold) or "onnx:<case>" (export/verify/ORT) -> bug id
