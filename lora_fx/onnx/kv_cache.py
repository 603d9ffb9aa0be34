"""A decoder LM's KV cache as ONNX graph inputs and outputs, for ``export_onnx(..., kv_cache=True)``.

Generation re-runs the model once per new token; without a cache every step recomputes the whole prefix. ONNX
deployments (optimum's ``ORTModelForCausalLM``, onnxruntime-genai) therefore export one file whose cache is plain
tensors, and lora_fx lays its files out the way they do:

    inputs   input_ids [batch, sequence]   attention_mask [batch, total_sequence]   position_ids [batch, sequence]
             past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim]   (i = 0 .. layers-1)
    outputs  logits [batch, sequence, vocab]
             present.{i}.key / .value [batch, kv_heads, past_sequence + sequence, head_dim]

One file serves the prompt (prefill: ``past_sequence`` = 0, empty past tensors) and the one-token steps; batch and
every length are dynamic; ``total_sequence`` = past + new tokens (the mask covers both, 0 for left padding).

torch.export rejects transformers' ``DynamicCache`` as an input, so the exported module is `CacheDecoder`: it takes
the cache as flat tensors, builds a ``DynamicCache`` inside, calls the model and returns the new cache flat. Base,
merged and unmerged adapted models go through the same wrapper (an adapted model through the graph it captured for
a call with a cache), so base and merged files of one model are the same graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lora_fx.errors import InputError
from lora_fx.onnx.names import BATCH, SEQUENCE

PAST = "past_key_values.{}.{}"  # optimum and onnxruntime-genai: past_key_values.%d.key / .value
PRESENT = "present.{}.{}"  # present.%d.key / .value
PAST_SEQUENCE, TOTAL_SEQUENCE = "past_sequence", "total_sequence"
INPUTS = ("input_ids", "attention_mask", "position_ids")


def past_names(layers: int) -> list[str]:
    return [PAST.format(i, part) for i in range(layers) for part in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [PRESENT.format(i, part) for i in range(layers) for part in ("key", "value")]


class CacheDecoder(nn.Module):
    """``model`` with its KV cache as flat tensors: (input_ids, attention_mask, position_ids, k0, v0, k1, v1, ...)
    -> (logits, new k0, new v0, ...). The cache object is built inside, so the exporter sees only tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        from lora_fx.passes.capture import cache_tensors, fill_cache

        cache = fill_cache(DynamicCache(), list(past))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        logits = out["logits"] if isinstance(out, dict) else out[0]
        returned = out["past_key_values"] if isinstance(out, dict) else out[1]
        return (logits, *cache_tensors(returned if returned is not None else cache))


@dataclasses.dataclass
class CacheExample:
    """Example inputs of a one-token-or-more step after a cached prefix, and what the file will be named."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    past: list[torch.Tensor]

    @property
    def layers(self) -> int:
        return len(self.past) // 2

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.attention_mask, self.position_ids, *self.past)

    def call_kwargs(self) -> dict[str, Any]:
        """The model call this step is (a fresh cache each time: a call writes into its cache)."""
        from transformers.cache_utils import DynamicCache

        from lora_fx.passes.capture import fill_cache

        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids,
                    past_key_values=fill_cache(DynamicCache(), [t.clone() for t in self.past]), use_cache=True)

    def dynamic_shapes(self) -> dict[str, Any]:
        cache = {0: BATCH, 2: PAST_SEQUENCE}
        return {"input_ids": {0: BATCH, 1: SEQUENCE}, "attention_mask": {0: BATCH, 1: TOTAL_SEQUENCE},
                "position_ids": {0: BATCH, 1: SEQUENCE}, "past": tuple(dict(cache) for _ in self.past)}

    def input_names(self) -> list[str]:
        return [*INPUTS, *past_names(self.layers)]

    def output_names(self) -> list[str]:
        return ["logits", *present_names(self.layers)]

    def axis_names(self) -> dict[str, dict[int, str]]:
        return {"input_ids": {0: BATCH, 1: SEQUENCE}, "attention_mask": {0: BATCH, 1: TOTAL_SEQUENCE},
                "position_ids": {0: BATCH, 1: SEQUENCE},
                **{name: {0: BATCH, 2: PAST_SEQUENCE} for name in past_names(self.layers)}}


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(getattr(embeddings, "num_embeddings", 0) or 0)


def example_step(model: nn.Module, batch: int = 2, past: int = 5, new: int = 3) -> CacheExample:
    """Example inputs for the export: a prefill of `past` tokens on `model` (no grad, eval) gives the cache's layout
    (layers, kv heads, head size, dtype); then a step of `new` tokens. Sizes differ from each other and from 0 and
    1, so torch.export keeps every one of them dynamic."""
    from lora_fx.passes.capture import cache_tensors
    from lora_fx.passes.trace import eval_mode

    where = f"export_onnx({type(model).__name__}, kv_cache=True)"
    vocab = _vocab_size(model)
    if vocab <= 0:
        raise InputError("kv_cache=True needs a decoder LM with token inputs, and this model has no vocab_size in "
                         "its config and no input embeddings", where=where,
                         fix="export a transformers causal LM (e.g. LlamaForCausalLM), or kv_cache=False")
    parameter = next((p for p in model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, past), generator=generator).to(device)
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
    except Exception as err:
        raise InputError(f"kv_cache=True runs the model once on token ids with use_cache=True, and that failed: "
                         f"{type(err).__name__}: {err}", where=where,
                         fix="export a transformers causal LM whose forward takes input_ids, attention_mask, "
                             "position_ids and past_key_values (a DynamicCache)") from err
    cache = out.get("past_key_values") if isinstance(out, dict) else None
    tensors = cache_tensors(cache) if cache is not None and hasattr(cache, "layers") else []
    if not tensors:
        raise InputError("kv_cache=True needs a model that returns its KV cache (past_key_values, a DynamicCache), "
                         f"and {type(model).__name__} returned {type(cache).__name__}", where=where,
                         fix="export a transformers decoder LM (use_cache=True must return a DynamicCache), or "
                             "kv_cache=False")
    ids = torch.randint(0, vocab, (batch, new), generator=generator).to(device)
    mask = torch.ones(batch, past + new, dtype=torch.long, device=device)
    positions = torch.arange(past, past + new, device=device).unsqueeze(0).expand(batch, new).contiguous()
    return CacheExample(ids, mask, positions, [t.detach().clone() for t in tensors])


def name_io(model: Any, example: CacheExample) -> None:
    """Name the exported graph's inputs as optimum and onnxruntime-genai do (an onnx_ir Model, in place); the
    outputs and dims are named by lora_fx.onnx.names.name_interface."""
    wanted = example.input_names()
    inputs = list(model.graph.inputs)
    if len(inputs) != len(wanted):
        raise InputError(f"the exported graph has {len(inputs)} inputs, expected {len(wanted)} "
                         f"({', '.join(wanted[:4])}, ...)", where="export_onnx(kv_cache=True)",
                         fix="report this as a lora_fx bug with the model's class")
    for value, name in zip(inputs, wanted):
        value.name = name
