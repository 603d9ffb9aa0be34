"""Tiny models for the coverage matrix: 2 layers, hidden 32-64, random weights, built from configs (offline).

Every builder returns ``(model, example_args, example_kwargs)`` with the model in eval mode and seeded weights.
``ZOO`` lists them as ``Entry`` records: the front ends that apply, whether the model is slow, whether its first
output is an LM's logits (loss: cross-entropy) or anything else (loss: MSE to a fixed random target), and how to
make inputs of another batch / sequence size (for the dynamic-shape checks).

transformers models are built from configs (no download); timm builders skip cleanly when timm is not installed
(``pytest.importorskip``). Used by tests/test_models.py and benchmarks/coverage.py.

The end of the file holds the steps both of them run on one (model, front end) case, so the tests and the coverage
table measure exactly the same thing: ``run_case`` does adapt -> 3 AdamW steps -> fold -> ONNX export of the base
model and of the merged one -> verify_onnx -> ONNX Runtime parity, recording every number in a ``CaseResult``.
"""

from __future__ import annotations

import copy

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


def _ids(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _images(batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=g)


def _tokens(batch: int = BATCH, seq: int = SEQ, dim: int = HIDDEN, seed: int = 1) -> torch.Tensor:
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
    return (_ids(batch, seq),), {"attention_mask": torch.ones(batch, seq, dtype=torch.long)}


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
    ids = _ids(batch, seq)
    return model, (ids,), {"attention_mask": torch.ones(batch, seq, dtype=torch.long),
                           "decoder_input_ids": _ids(batch, seq, seed=2)}


def vit(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ):
    model = _hf("ViTConfig", "ViTForImageClassification", attn, image_size=IMAGE, patch_size=8,
                hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=2 * HIDDEN, num_labels=10)
    return model, (_images(batch),), {}


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
    return builder(timm).eval(), (_images(batch),), {}


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
    return model.eval(), (_tokens(batch, seq),), {}


def transformer_decoder(batch: int = BATCH, seq: int = SEQ):
    """nn.TransformerDecoder: self-attention and cross-attention (in_proj_weight split into q and kv rows)."""
    _seeded()
    layer = nn.TransformerDecoderLayer(HIDDEN, HEADS, dim_feedforward=2 * HIDDEN, dropout=0.0, batch_first=True)
    model = nn.TransformerDecoder(layer, LAYERS)
    return model.eval(), (_tokens(batch, seq), _tokens(batch, seq + 2, seed=2)), {}


def mha(batch: int = BATCH, seq: int = SEQ):
    """nn.MultiheadAttention at top level, self-attention: packed in_proj_weight through F.linear."""
    _seeded()
    model = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
    x = _tokens(batch, seq)
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
    return MHAWrapper().eval(), (_tokens(batch, seq),), {}


class NarrowHead(nn.Module):
    """A toy classifier whose head has 2 outputs (narrower than the default r=8)."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)).mean(1))


def narrow_head(batch: int = BATCH, seq: int = SEQ):
    _seeded()
    return NarrowHead().eval(), (_tokens(batch, seq),), {}


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
    return Functional().eval(), (_tokens(batch, seq),), {}


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
    return SharedWeight().eval(), (_tokens(batch, seq), _tokens(batch, seq, seed=2)), {}


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
    return ConvBN().eval(), (_images(batch),), {}


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
    return TiedLM().eval(), (_ids(batch, seq),), {}


def gpt2_tied(attn: str = "sdpa", batch: int = BATCH, seq: int = SEQ):
    return gpt2(attn, tie=True, batch=batch, seq=seq)


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


# ------------------------------------------------------------------------------------------------ the pipeline
# Fold parity tolerance, relative to the output's scale (max |y|, at least 1). Folding changes the order of the
# floating-point sums: x·(W0 + s·B·A)ᵀ is rounded once per weight, x·W0ᵀ + s·((x·Aᵀ)·Bᵀ) rounds its two products and
# their sum separately. Each matmul of K = 32..64 terms is off by about K·eps relative (fp32 eps = 1.2e-7: ~4e-6),
# and 2 layers with residuals, normalisations and softmax carry that to the output: 1e-5 relative holds with
# margin in fp32 while a fold that dropped or doubled a LoRA (delta ~1e-2 after 3 steps at lr 1e-2) is far above.
# bf16 weights (--dtype bfloat16) round W0 + delta to 8 bits of mantissa once (eps = 7.8e-3): 5e-2 relative.
FOLD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
ORT_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
STEPS, LR = 3, 1e-2


def first_output(out) -> torch.Tensor:
    """The first tensor of a model's output (logits, last_hidden_state, ...)."""
    from lora_fx.passes.trace import flatten_outputs
    tensors = flatten_outputs(out)
    if not tensors:
        raise TypeError(f"the model returned no tensor ({type(out).__name__})")
    return tensors[0]


def to_device(value, device, dtype=None):
    """Tensors of nested args/kwargs to `device`; floating ones to `dtype` too (ids and masks keep theirs)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device, dtype) for v in value)
    return value


def max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, output scale max(1, max |b|)), in fp32."""
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).abs().max().item(), max(1.0, b.abs().max().item())


class Loss:
    """A fixed task on the example batch: cross-entropy to fixed random labels for LMs, MSE to a fixed random
    target otherwise. Fixed (seeded) so the first and last loss are comparable."""

    def __init__(self, entry: Entry, reference: torch.Tensor):
        g = torch.Generator().manual_seed(1234)
        self.lm = entry.lm
        if self.lm:
            self.target = torch.randint(0, reference.shape[-1], reference.shape[:-1], generator=g)
        else:
            self.target = torch.randn(reference.shape, generator=g)
        self.target = self.target.to(reference.device)

    def __call__(self, out) -> torch.Tensor:
        y = first_output(out).float()
        if self.lm:
            return F.cross_entropy(y.reshape(-1, y.shape[-1]), self.target.reshape(-1))
        return F.mse_loss(y, self.target)


def _autocast(device: str, dtype: torch.dtype):
    import contextlib
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def train_steps(adapted: nn.Module, args: tuple, kwargs: dict, loss: Loss, *, steps: int = STEPS, lr: float = LR,
                device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[float]:
    """`steps` AdamW steps on the LoRA parameters (train mode); returns the eval-mode loss on the same batch
    before the first step and after each step (steps + 1 values)."""
    import lora_fx

    def eval_loss() -> float:
        adapted.eval()
        with torch.no_grad(), _autocast(device, dtype):
            return loss(adapted(*args, **kwargs)).item()

    params = list(lora_fx.lora_parameters(adapted))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = [eval_loss()]
    for _ in range(steps):
        adapted.train()
        with _autocast(device, dtype):
            value = loss(adapted(*args, **kwargs))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(eval_loss())
    adapted.eval()
    return losses


@dataclass
class CaseResult:
    """Everything the matrix measures on one (model, front end) case."""

    model: str
    frontend: str
    status: str = "fail"  # "pass", "fail", "skip"
    step: str = ""  # the step that failed or skipped
    error: str = ""  # first line of the error
    frontend_used: str = ""
    sites: int | None = None  # candidate sites the match pass found
    adapted_sites: int | None = None  # sites that got a LoRA branch
    loras: int | None = None  # LoRA modules (one per weight)
    start_err: float | None = None  # |adapted - model| / scale before training (B = 0: ~0)
    dynamic_err: float | None = None  # the same at another batch / sequence size
    losses: list = field(default_factory=list)  # eval loss before training and after each step
    fold_err: float | None = None  # |folded - adapted| / scale on the example inputs
    fold_dyn_err: float | None = None  # the same at the other batch / sequence size
    lora_effect: float | None = None  # |folded - model| / scale: training changed the output
    verify_identical: bool | None = None
    verify_differences: list = field(default_factory=list)
    ort_err: float | None = None  # max |ORT - merged module| over all outputs (absolute)
    ort_ok: bool | None = None  # lora_fx.check_parity's verdict (its dtype tolerances)
    ort_provider: str = ""
    seconds: dict = field(default_factory=dict)

    @property
    def loss_first(self):
        return self.losses[0] if self.losses else None

    @property
    def loss_last(self):
        return self.losses[-1] if self.losses else None


class CaseFailure(AssertionError):
    """A check of the matrix failed (as opposed to an exception raised by lora_fx or the model)."""


class Case:
    """One (model, front end) case run step by step; each step fills `result` and raises on failure.

        case = Case(entry, "export"); case.build(); case.adapt(); case.train(); case.fold(); case.onnx(tmp)
    """

    def __init__(self, entry: Entry, frontend: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 ort_device: str = "cpu"):
        self.entry, self.frontend, self.device, self.dtype = entry, frontend, device, dtype
        self.ort_device = ort_device  # lora_fx.check_parity(device=...): "cpu", "cuda" or "auto"
        self.result = CaseResult(entry.name, frontend)
        self.fold_rtol = FOLD_RTOL[dtype]

    # -------------------------------------------------------------- step bookkeeping
    def _start(self, step: str) -> None:
        import time
        self.result.step = step
        self._t0 = time.perf_counter()

    def _end(self) -> None:
        import time
        self.result.seconds[self.result.step] = round(time.perf_counter() - self._t0, 2)

    @staticmethod
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise CaseFailure(message)

    def _rel(self, got, want) -> float:
        err, scale = max_err(got, want)
        return err / scale

    def _run(self, module, other: bool = False) -> torch.Tensor:
        args, kwargs = (self.other_args, self.other_kwargs) if other else (self.args, self.kwargs)
        with torch.no_grad(), _autocast(self.device, self.dtype):
            return first_output(module(*args, **kwargs))

    # -------------------------------------------------------------- steps
    def build(self) -> None:
        self._start("build")
        e = self.entry
        model, args, kwargs = e()
        _, other_args, other_kwargs = e(batch=OTHER_BATCH, seq=OTHER_SEQ if e.dynamic_seq else SEQ)
        self.model = model.to(self.device, self.dtype)
        self.args, self.kwargs = to_device(args, self.device, self.dtype), to_device(kwargs, self.device, self.dtype)
        self.other_args = to_device(other_args, self.device, self.dtype)
        self.other_kwargs = to_device(other_kwargs, self.device, self.dtype)
        self.before = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.reference, self.other_reference = self._run(self.model), self._run(self.model, other=True)
        self._end()

    def adapt(self, **options) -> None:
        """adapt; B = 0 so the adapted model equals the model, at the example shapes and at other ones
        (torch.export traces with Dim.AUTO: batch and sequence stay dynamic)."""
        import lora_fx
        self._start("adapt")
        r = self.result
        self.adapted = lora_fx.adapt(self.model, example_inputs=self.args, example_kwargs=self.kwargs,
                                     frontend=self.frontend, **{**self.entry.options, **options})
        self.state = lora_fx.graph(self.adapted).meta["lora_fx"]
        r.frontend_used = self.state.frontend
        r.sites = len(self.state.sites)
        r.adapted_sites = sum(d.adapted for d in self.state.decisions)
        r.loras = len(self.adapted.lora_fx)
        self.adapted.eval()
        r.start_err = self._rel(self._run(self.adapted), self.reference)
        self.check(r.start_err <= self.fold_rtol, f"adapted model (B = 0) differs from the model: {r.start_err:.2e}")
        self._end()
        self._start("dynamic")
        r.dynamic_err = self._rel(self._run(self.adapted, other=True), self.other_reference)
        self.check(r.dynamic_err <= self.fold_rtol,
                   f"adapted model at batch {OTHER_BATCH} / another sequence length differs: {r.dynamic_err:.2e}")
        self._end()

    def train(self, steps: int = STEPS, lr: float = LR) -> None:
        self._start("train")
        r = self.result
        r.losses = train_steps(self.adapted, self.args, self.kwargs, Loss(self.entry, self.reference), steps=steps,
                               lr=lr, device=self.device, dtype=self.dtype)
        self.check(all(v == v for v in r.losses), f"loss is NaN: {r.losses}")
        self.check(r.losses[-1] < r.losses[0], f"loss did not fall in {steps} steps: {r.losses}")
        changed = [k for k, v in self.model.state_dict().items() if not torch.equal(v, self.before[k])]
        self.check(not changed, f"LoRA training changed the user's model (base in train mode): {changed[:4]}")
        self._end()

    def fold(self) -> None:
        """fold (inplace=False): the graph equals the traced original, the output equals the adapted model's
        (FOLD_RTOL), the user's model is untouched, and the LoRA did change the output."""
        import lora_fx
        from lora_fx.passes.infra import first_difference, graph_signature
        self._start("fold")
        r = self.result
        self.merged = lora_fx.fold(self.adapted)
        self.check("lora_fx" not in self.merged._modules, "the folded module still holds the LoRA container")
        folded_graph = lora_fx.fold(lora_fx.graph(self.adapted))  # the graph-level fold: the graph as traced
        difference = first_difference(self.state.original_graph, graph_signature(folded_graph.graph))
        self.check(difference is None, f"folded graph differs from the traced original: {difference}")
        self.adapted.eval()
        self.merged.eval()
        self.y_adapted = self._run(self.adapted)
        self.y_merged = self._run(self.merged)
        r.fold_err = self._rel(self.y_merged, self.y_adapted)
        r.fold_dyn_err = self._rel(self._run(self.merged, other=True), self._run(self.adapted, other=True))
        r.lora_effect = self._rel(self.y_merged, self.reference)
        changed = [k for k, v in self.model.state_dict().items() if not torch.equal(v, self.before[k])]
        self.check(not changed, f"fold(inplace=False) changed the user's model: {changed[:5]}")
        self.check(r.fold_err <= self.fold_rtol,
                   f"folded model differs from the adapted one: {r.fold_err:.2e} > {self.fold_rtol:g} (relative)")
        self.check(r.fold_dyn_err <= self.fold_rtol,
                   f"folded model differs from the adapted one at another batch/seq: {r.fold_dyn_err:.2e}")
        self.check(r.lora_effect > 5 * max(r.fold_err, FOLD_RTOL[torch.float32]),
                   f"the trained LoRA changed nothing beyond rounding: |folded - model| = {r.lora_effect:.2e}, "
                   f"|folded - adapted| = {r.fold_err:.2e}")
        self._end()

    def fx_half(self) -> CaseResult:
        self.build()
        self.adapt()
        self.train()
        self.fold()
        self.result.status, self.result.step = "pass", ""
        return self.result

    def onnx(self, out_dir) -> CaseResult:
        """Export the base model and the merged one with lora_fx.export_onnx, verify_onnx them (identical
        structure), and check ONNX Runtime against the merged module with lora_fx.check_parity."""
        import pathlib

        import lora_fx
        self.result.status = "fail"
        self._start("onnx")
        r = self.result
        out_dir = pathlib.Path(out_dir)
        stem = f"{self.entry.name}-{self.frontend}"
        self.base_path, self.merged_path = out_dir / f"{stem}-base.onnx", out_dir / f"{stem}-merged.onnx"
        lora_fx.export_onnx(self.model, self.base_path, self.args, self.kwargs)
        lora_fx.export_onnx(self.merged, self.merged_path, self.args, self.kwargs)
        self._end()

        self._start("verify")
        report = lora_fx.verify_onnx(self.base_path, self.merged_path)
        r.verify_identical, r.verify_differences = bool(report.identical), list(report.differences)
        self.check(r.verify_identical, f"merged ONNX differs from the base ONNX: {r.verify_differences[:3]}")
        self._end()

        self._start("ort")
        if self.dtype == torch.float32:
            parity = lora_fx.check_parity(self.merged_path, self.merged, self.args, self.kwargs,
                                          device=self.ort_device)
        else:
            # ONNX Runtime has no bf16 kernel for most ops (and rejects bf16 Conv, BatchNorm, ... at load), and a
            # graph traced in bf16 keeps its dtype casts when cast to fp32: put the merged weights into a fresh
            # fp32 copy of the model on the CPU (no TF32 there), export that, and check ORT against it. The bf16
            # files themselves are what verify compared above.
            model32, args32, kwargs32 = self.entry()
            merged = self.merged.state_dict()
            missing = [k for k, _ in model32.named_parameters() if k not in merged]
            self.check(not missing, f"merged weights do not name the model's parameters: {missing[:4]}")
            model32.load_state_dict({k: v.float().cpu() for k, v in merged.items()}, strict=False)
            fp32_path = out_dir / f"{stem}-merged-fp32.onnx"
            lora_fx.export_onnx(model32, fp32_path, args32, kwargs32)
            parity = lora_fx.check_parity(fp32_path, model32, args32, kwargs32, device=self.ort_device)
            r.error = f"(ORT ran an fp32 export of the merged {str(self.dtype).removeprefix('torch.')} weights)"
        r.ort_err, r.ort_ok, r.ort_provider = float(parity.max_abs_err), bool(parity.ok), parity.provider
        self.check(r.ort_ok, f"ONNX Runtime differs from the merged module: max abs err {r.ort_err:.2e} "
                             f"(atol {parity.atol:g}, rtol {parity.rtol:g})")
        self._end()
        r.status, r.step = "pass", ""
        return r


def onnx_available() -> str | None:
    """None when lora_fx's ONNX half (export, verify, runtime) imports, else why not."""
    try:
        import lora_fx.onnx.export  # noqa: F401
        import lora_fx.onnx.verify  # noqa: F401
        import lora_fx.onnx.runtime  # noqa: F401
    except ImportError as e:
        return f"lora_fx ONNX half not available: {e}"
    return None
