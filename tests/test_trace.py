"""The trace pass (passes/trace.py): both front ends, dynamic sizes, and the fallback to torch.export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import Rule
from tests.conftest import randomize_lora, state_of

FRONTENDS = ["fx", "export"]


def test_export_frontend_takes_other_batch_and_sequence_sizes(block):
    model, args = block
    adapted = lora_fx.adapt(model, example_inputs=args, frontend="export")
    randomize_lora(adapted)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        assert torch.allclose(adapted(x), lora_fx.fold(adapted)(x), atol=1e-5)


def test_auto_frontend_falls_back_to_export_for_control_flow():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[0] > 1:  # symbolic tracing cannot follow this; torch.export can
                return self.fc(x)
            return self.fc(-x)

    model, x = Branchy(), torch.ones(2, 4)
    adapted = lora_fx.adapt(model, example_inputs=(x,), r=2)
    assert state_of(adapted).frontend == "export"
    assert torch.equal(adapted(x), model(x))


def test_transformers_model_through_torch_export():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    adapted = lora_fx.adapt(model, rules=[Rule(name="q_proj|v_proj", r=4)], example_inputs=(ids,))
    assert state_of(adapted).frontend == "export"
    assert sorted(adapted.lora_fx) == [f"model_layers_{i}_self_attn_{p}_proj" for i in range(2) for p in "qv"]
    assert torch.equal(adapted(ids)[0] if isinstance(adapted(ids), tuple) else adapted(ids).logits,
                       model(ids).logits)
    losses = []
    opt = torch.optim.AdamW(lora_fx.lora_parameters(adapted), lr=1e-2)
    for _ in range(8):
        logits = adapted(ids)
        logits = logits[0] if isinstance(logits, tuple) else logits.logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merged = lora_fx.fold(adapted)
    out = lambda m: (lambda o: o[0] if isinstance(o, tuple) else o.logits)(m(ids))
    with torch.no_grad():
        assert torch.allclose(out(merged), out(adapted), atol=1e-4)
