"""genai_config.json beside a KV-cache export, so onnxruntime-genai serves the merged model as it is.

onnxruntime-genai (Microsoft's generation loop for ONNX Runtime) loads a folder holding the decoder file and a
genai_config.json that says what the file is: its input and output names (lora_fx's KV-cache files use the names
genai expects, lora_fx/onnx/kv_cache.py), the cache's shape (layers, kv heads, head size) and the default search
options. This writes that file from the model's transformers config, so the deployment path is:
``export_onnx(merged, "out/model.onnx", ..., kv_cache=True)`` then ``write_genai_config("out/model.onnx", merged.config)``
then ``onnxruntime_genai.Model("out")``. Checked against onnxruntime-genai 0.18.0 (docs/onnx.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lora_fx.atomic import atomic_file
from lora_fx.errors import ExportError, InputError
from lora_fx.onnx.kv_cache import PAST, PRESENT

CONFIG_NAME = "genai_config.json"
# transformers model_type -> genai's "type" (genai knows these decoder families by name)
TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma": "gemma",
         "gemma2": "gemma2", "phi": "phi", "granite": "granite", "olmo": "olmo"}


def genai_config(config: Any, filename: str = "model.onnx", *, provider: str | None = None,
                 max_length: int | None = None) -> dict[str, Any]:
    """The genai_config.json content for a decoder exported with ``export_onnx(kv_cache=True)`` as `filename`."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    needed = ("model_type", "num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size")
    missing = [k for k in needed if getattr(text, k, None) is None]
    if missing:
        raise InputError(f"the model config has no {missing}", where=type(config).__name__,
                         fix="pass the transformers config of the exported decoder (model.config)")
    heads = text.num_attention_heads
    head_size = getattr(text, "head_dim", None) or text.hidden_size // heads
    context = max_length or getattr(text, "max_position_embeddings", None) or 2048
    options = [{provider: {}}] if provider else []
    pad = getattr(text, "pad_token_id", None)
    eos = getattr(text, "eos_token_id", None)
    return {
        "model": {
            "type": TYPES.get(text.model_type, text.model_type),
            "bos_token_id": getattr(text, "bos_token_id", None),
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "context_length": context,
            "vocab_size": text.vocab_size,
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "lora_fx", "provider_options": options},
                "head_size": head_size,
                "hidden_size": text.hidden_size,
                "num_attention_heads": heads,
                "num_hidden_layers": text.num_hidden_layers,
                "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": PAST.format("%d", "key"), "past_value_names": PAST.format("%d", "value")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT.format("%d", "key"),
                            "present_value_names": PRESENT.format("%d", "value")},
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_config(onnx_path: str | os.PathLike, config: Any, *, provider: str | None = None,
                       max_length: int | None = None) -> Path:
    """Write genai_config.json beside `onnx_path` (a file from ``export_onnx(kv_cache=True)``); returns its path.
    provider: "cuda" to ask genai for its CUDA provider (default: the CPU)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError("the ONNX file does not exist", where=str(onnx_path),
                          fix="export the decoder first: lora_fx.export_onnx(model, path, ..., kv_cache=True)")
    content = genai_config(config, onnx_path.name, provider=provider, max_length=max_length)
    target = onnx_path.parent / CONFIG_NAME
    with atomic_file(target) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(content, indent=2))
    return target
