"""Token generation on ONNX Runtime from a KV-cache decoder file (``export_onnx(..., kv_cache=True)``).

    tokens = lora_fx.generate_onnx("merged.onnx", input_ids, attention_mask, max_new_tokens=32)

A merged file is only worth deploying if it generates what the trained model generates, so this loop does what
transformers' ``generate`` does for a decoder (greedy, or sampling with temperature / top-k / top-p), with the same
position ids for left-padded batches (``cumsum(attention_mask) - 1``, 1 on padding), and its tokens are tested
equal to ``generate`` on the merged PyTorch model.

Every run uses IO binding over torch tensors on the session's device: on CUDA the cache stays on the GPU from one
step to the next (each step's ``present.*`` outputs are bound as the next step's ``past_key_values.*`` inputs), the
next token is chosen on the GPU, and only the chosen ids come back to the host. On CPU the same loop runs over CPU
tensors, which is how it is tested here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import torch

from lora_fx.errors import InputError

# ONNX TensorProto element types of the tensors the loop binds (IO binding takes them as integers)
_ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.float64: 11, torch.int64: 7,
               torch.int32: 6, torch.bool: 9}
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
              "tensor(double)": torch.float64, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


@dataclasses.dataclass(frozen=True)
class DecoderIO:
    """What a KV-cache decoder file takes and returns, read from its session."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    cache_dtype: torch.dtype
    mask_dtype: torch.dtype
    position_ids: bool


def decoder_io(session: Any, where: str = "generate_onnx") -> DecoderIO:
    """Read the cache layout of a session; InputError when the file has no KV cache."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    past = sorted((int(m[1]), m[2]) for m in (_PAST.match(n) for n in inputs) if m)
    if not past or "input_ids" not in inputs or "logits" not in outputs:
        raise InputError(f"the ONNX file is not a decoder with a KV cache (inputs: {', '.join(list(inputs)[:6])})",
                         where=where, fix="export the model with lora_fx.export_onnx(model, path, kv_cache=True) "
                                          "(CLI: lora-fx export ... --kv-cache)")
    layers = past[-1][0] + 1
    key = inputs["past_key_values.0.key"]
    _, kv_heads, _, head_dim = key.shape
    vocab = outputs["logits"].shape[-1]
    if not all(isinstance(d, int) for d in (kv_heads, head_dim, vocab)):
        raise InputError(f"the cache's heads and head size and the vocabulary must be static dims, got "
                         f"{key.shape} and logits {outputs['logits'].shape}", where=where,
                         fix="export with lora_fx.export_onnx(kv_cache=True), which keeps them static")
    mask = inputs.get("attention_mask")
    return DecoderIO(layers, kv_heads, head_dim, vocab, _ORT_TYPES.get(key.type, torch.float32),
                     _ORT_TYPES.get(mask.type, torch.int64) if mask is not None else torch.int64,
                     "position_ids" in inputs)


def position_ids(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """transformers' position ids for a (left-)padded batch: the count of real tokens before each one; 1 on
    padding (never read). The last `new` columns."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -new:]


def _file_generation_config(session: Any, pad_token_id: int | None) -> tuple[Any, int | None]:
    """(eos ids, pad id) from the metadata export_onnx(kv_cache=True) writes; (None, pad_token_id) without it."""
    meta = session.get_modelmeta().custom_metadata_map
    eos, pad = (_token_ids(meta.get(f"lora_fx.{key}")) for key in ("eos_token_id", "pad_token_id"))
    if pad_token_id is None and eos:
        pad_token_id = pad[0] if pad else eos[0]
    return eos, pad_token_id


def _token_ids(text: str | None) -> list[int]:
    """A metadata value written by generation_metadata: an int or a list of ints ([] when absent or not that)."""
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        return []
    value = [value] if isinstance(value, int) else value
    ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    return value if ok else []


def generate_onnx(
    model: str | os.PathLike | Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    device: str = "auto",
) -> torch.Tensor:
    """Generate up to `max_new_tokens` tokens after `input_ids` (batch, prompt) with a KV-cache ONNX file (a path or
    an InferenceSession) and return prompt + new tokens, as ``model.generate`` does.

    `attention_mask` (1 = token, 0 = padding; left padding for batches of unequal prompts) defaults to all ones.
    Greedy by default; ``do_sample=True`` samples after temperature, top-k and top-p, with `generator` for
    reproducible draws. A sequence that produced an `eos_token_id` continues with `pad_token_id`, and the loop
    stops when every sequence has. eos_token_id=None takes the exported model's generation_config (export_onnx
    writes its eos and pad ids into the file's metadata; pad falls back to the first eos id, as generate does);
    eos_token_id=[] never stops early. `device`: "auto" (CUDA when ONNX Runtime can use it), "cuda" or "cpu".
    """
    from lora_fx.onnx.runtime import CUDA, _as_session

    where = "generate_onnx"
    session = _as_session(model, device)
    io = decoder_io(session, where)
    input_ids = _check_ids(input_ids, io, where)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}", where=where,
                         fix="pass the tokenizer's attention_mask (1 = token, 0 = padding), or None")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}", where=where,
                         fix="ask for one or more new tokens")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
        raise InputError(f"sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0 (got {temperature}, "
                         f"{top_p}, {top_k})", where=where, fix="use do_sample=False for greedy decoding")
    if eos_token_id is None:  # what the exported model's generate stops at (export_onnx wrote its generation_config)
        eos_token_id, pad_token_id = _file_generation_config(session, pad_token_id)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []))
    if eos.numel() and pad_token_id is None:
        raise InputError("eos_token_id needs a pad_token_id to fill finished sequences with", where=where,
                         fix="pass pad_token_id (e.g. the tokenizer's pad id, or the eos id)")

    on_cuda = CUDA in session.get_providers()
    if on_cuda and not torch.cuda.is_available():
        raise InputError("ONNX Runtime runs this file on CUDA, but this torch has no CUDA, so the loop cannot keep "
                         "the cache on the GPU", where=where,
                         fix="install torch with CUDA beside onnxruntime-gpu, or pass device='cpu'")
    dev = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    step = DecodeStep(session, io, dev)
    ids = input_ids.to(dev)
    mask = attention_mask.to(dev, io.mask_dtype)
    batch = ids.shape[0]
    past = [torch.empty(batch, io.kv_heads, 0, io.head_dim, dtype=io.cache_dtype, device=dev)
            for _ in range(2 * io.layers)]
    tokens = [input_ids.cpu()]
    unfinished = torch.ones(batch, dtype=torch.bool)
    eos = eos.to(torch.long)
    new = ids
    for _ in range(max_new_tokens):
        last, past = step(new, mask, past)
        next_ids = _choose(last.float(), do_sample, temperature, top_k, top_p, generator).cpu()
        if eos.numel():
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad_token_id))
            unfinished &= ~torch.isin(next_ids, eos)
        tokens.append(next_ids[:, None])
        if not unfinished.any():
            break
        new = next_ids[:, None].to(dev)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=dev)], dim=1)
    return torch.cat(tokens, dim=1)


class DecodeStep:
    """One run of the file with IO binding over torch tensors on `device`: inputs and the cache are bound where they
    are, the outputs are allocated there and bound, so nothing crosses to the host."""

    def __init__(self, session: Any, io: DecoderIO, device: torch.device):
        self.session, self.io, self.device = session, io, device
        self.kind = "cuda" if device.type == "cuda" else "cpu"
        self.index = device.index or 0
        self.names = {i.name for i in session.get_inputs()}

    def _bind(self, binding: Any, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        tensor = tensor.contiguous()
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.kind, self.index, _ONNX_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor,
                 past: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        io, batch, new = self.io, ids.shape[0], ids.shape[1]
        total = past[0].shape[2] + new
        inputs = {"input_ids": ids.to(torch.int64).contiguous(), "attention_mask": mask.contiguous()}
        if io.position_ids:
            inputs["position_ids"] = position_ids(mask, new).contiguous()
        logits = torch.empty(batch, new, io.vocab, dtype=io.cache_dtype, device=self.device)
        present = [torch.empty(batch, io.kv_heads, total, io.head_dim, dtype=io.cache_dtype, device=self.device)
                   for _ in past]
        binding = self.session.io_binding()
        for name, tensor in inputs.items():
            if name in self.names:
                self._bind(binding, name, tensor)
        for i, tensor in enumerate(past):
            self._bind(binding, f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}", tensor)
        self._bind(binding, "logits", logits, output=True)
        for i, tensor in enumerate(present):
            self._bind(binding, f"present.{i // 2}.{'key' if i % 2 == 0 else 'value'}", tensor, output=True)
        if self.kind == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready for ORT
        self.session.run_with_iobinding(binding)
        if self.kind == "cuda":
            binding.synchronize_outputs()
        return logits[:, -1, :], present


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """The next token per row: argmax, or a draw after transformers' temperature, top-k and top-p warpers."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_ids(input_ids: Any, io: DecoderIO, where: str) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise InputError(f"input_ids must be an integer tensor (batch, prompt length), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}", where=where,
                         fix="pass token ids as torch.tensor([[1, 2, 3]]) (one row per sequence)")
    if input_ids.shape[1] == 0:
        raise InputError("the prompt is empty", where=where, fix="pass at least one token id per row")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= io.vocab):
        raise InputError(f"token ids must lie in [0, {io.vocab}), got {int(input_ids.min())}..{int(input_ids.max())}",
                         where=where, fix="use ids from the model's tokenizer (its vocabulary has "
                                          f"{io.vocab} entries)")
    return input_ids.long()
