"""The causal-attention pass (passes/causal_attention.py): torch.export graphs of HF decoders carry a materialized
causal mask; adapt switches those SDPA calls to is_causal=True when the mask provably is causal, and fold puts
the mask back.

Tolerances: is_causal and the explicit mask compute the same softmax with other kernels (a different masking
order inside SDPA), so outputs agree to fp32 rounding: 1e-5 relative to the output's scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx.passes.causal_attention import causal_or_masked

import zoo as Z

RTOL = 1e-5


def _calls(adapted) -> tuple[int, int]:
    """(SDPA calls rewritten to causal_or_masked, SDPA calls with a mask) in the adapted model's graph."""
    gm = adapted if isinstance(adapted, torch.fx.GraphModule) else lora_fx.graph(adapted)
    causal = sum(n.target is causal_or_masked for n in gm.graph.nodes)
    masked = sum(n.target is torch.ops.aten.scaled_dot_product_attention.default and
                 (len(n.args) > 3 and n.args[3] is not None or n.kwargs.get("attn_mask") is not None)
                 for n in gm.graph.nodes)
    return causal, masked


def _logits(out):
    return Z.first_output(out)


def _close(a, b):
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= RTOL * scale


@pytest.fixture(scope="module")
def llama_ids():
    model, (ids,), _ = Z.llama("sdpa", seq=16)
    return model, ids


def test_decoder_mask_becomes_is_causal_and_fold_restores_it(llama_ids):
    model, ids = llama_ids
    torch.manual_seed(0)
    adapted = lora_fx.adapt(model, example_inputs=(ids,), frontend="export")
    plain = lora_fx.adapt(model, example_inputs=(ids,), frontend="export", causal_attention=False)
    assert _calls(adapted) == (Z.LAYERS, 0)
    assert _calls(plain) == (0, Z.LAYERS)
    for a, p in zip(adapted.lora_fx.values(), plain.lora_fx.values()):
        nn.init.normal_(a.lora_B, std=0.1)
        p.load_state_dict(a.state_dict())
    with torch.no_grad():
        # the example length, others below twice it (is_causal), and beyond it (the masked branch)
        for seq in (16, 9, 32, 40):
            x = Z.random_ids(2, seq)
            _close(_logits(adapted(x)), _logits(plain(x)))
        folded_graph = lora_fx.fold(lora_fx.graph(adapted, ids))  # the graph as traced, node for node, or raises
        assert _calls(folded_graph) == (0, Z.LAYERS)
        merged = lora_fx.fold(adapted)
        _close(_logits(merged(ids)), _logits(adapted(ids)))


def test_gradients_match_the_masked_graph(llama_ids):
    model, ids = llama_ids
    adapted = lora_fx.adapt(model, example_inputs=(ids,), frontend="export")
    plain = lora_fx.adapt(model, example_inputs=(ids,), frontend="export", causal_attention=False)
    for a, p in zip(adapted.lora_fx.values(), plain.lora_fx.values()):
        nn.init.normal_(a.lora_B, std=0.1)
        p.load_state_dict(a.state_dict())
    for m in (adapted, plain):
        _logits(m(ids)).float().pow(2).mean().backward()
    for (name, a), p in zip(adapted.lora_fx.named_parameters(), plain.lora_fx.parameters()):
        _close(a.grad, p.grad)


def test_a_padding_mask_input_keeps_the_mask(llama_ids):
    """attention_mask is an input whose values reach the mask (padding): no rewrite."""
    model, ids = llama_ids
    adapted = lora_fx.adapt(model, example_inputs=(ids,), example_kwargs={"attention_mask": torch.ones_like(ids)},
                            frontend="export")
    assert _calls(adapted) == (0, Z.LAYERS)


class _Attention(nn.Module):
    """SDPA with a mask built from the sequence length only: causal, causal with a sliding window, or full."""

    def __init__(self, kind: str, window: int = 4):
        super().__init__()
        self.kind, self.window = kind, window
        self.qkv = nn.Linear(Z.HIDDEN, 3 * Z.HIDDEN)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, Z.HEADS, -1)).permute(2, 0, 3, 1, 4)
        i = torch.arange(x.shape[1], device=x.device)
        mask = i[None, :] <= i[:, None]
        if self.kind == "window":
            mask = mask & (i[None, :] > i[:, None] - self.window)
        elif self.kind == "full":
            mask = torch.ones_like(mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("kind,window,rewritten", [("causal", 4, 1), ("window", 4, 0), ("window", 12, 0),
                                                   ("full", 4, 0)])
def test_only_a_provably_causal_mask_is_rewritten(kind, window, rewritten):
    """A window shorter than the example (4 < 8) is seen at once; one longer than it (12) at twice the example's
    sizes, where the pass also checks; a full mask is not causal."""
    x = Z.random_tokens(seq=Z.SEQ)
    adapted = lora_fx.adapt(_Attention(kind, window).eval(), example_inputs=(x,), frontend="export")
    assert _calls(adapted) == (rewritten, 1 - rewritten)


def test_beyond_the_checked_sizes_the_mask_is_used():
    """A window of 20 looks causal at the example length 8 and at 16, so the call is rewritten; at length 24 the
    window cuts in and only the masked fallback gives the model's output (is_causal would attend too far back)."""
    torch.manual_seed(0)
    model = _Attention("window", window=20).eval()
    adapted = lora_fx.adapt(model, example_inputs=(Z.random_tokens(seq=Z.SEQ),), frontend="export")
    assert _calls(adapted) == (1, 0)
    with torch.no_grad():
        for seq in (16, 24):
            x = Z.random_tokens(seq=seq, seed=3)
            _close(adapted(x), model(x))
        x = Z.random_tokens(seq=24, seed=3)
        q, k, v = model.qkv(x).unflatten(-1, (3, Z.HEADS, -1)).permute(2, 0, 3, 1, 4)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        assert (causal - model(x)).abs().max() > 1e-3  # at 24 the window matters, so the test can tell


def test_compiles_fullgraph():
    x = Z.random_tokens(seq=Z.SEQ)
    adapted = lora_fx.adapt(_Attention("causal").eval(), example_inputs=(x,), frontend="export")
    assert _calls(adapted) == (1, 0)
    nn.init.normal_(adapted.lora_fx["qkv"].lora_B, std=0.1)
    compiled = torch.compile(adapted, backend="aot_eager", fullgraph=True)
    _close(compiled(x), adapted(x))


class DirectAttention(nn.Module):
    """Attention that reads the projections' outputs as they are (3-D SDPA) under an explicit causal mask."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        i = torch.arange(x.shape[-2], device=x.device)
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), attn_mask=i[:, None] >= i[None, :])


def test_fold_restores_attention_that_reads_lora_outputs_directly():
    """The kept SDPA call names its inputs, here the LoRA add nodes themselves: fold put it back after removing
    them and failed with KeyError: 'add'."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    adapted = lora_fx.adapt(DirectAttention().eval(), example_inputs=(x,), frontend="export")
    assert _calls(adapted) == (1, 0)
    for lora in adapted.lora_fx.values():
        nn.init.normal_(lora.lora_B, std=0.1)
    with torch.no_grad():
        merged = lora_fx.fold(adapted)
        _close(merged(x), adapted(x))
        assert _calls(lora_fx.fold(lora_fx.graph(adapted, x))) == (0, 1)
