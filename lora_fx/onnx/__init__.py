"""lora_fx's ONNX side, one module a job:

    export.py   export_onnx: one fixed set of exporter settings for base, merged and unmerged models
    names.py    the names an export carries (inputs, outputs, dynamic dims)
    verify.py   verify_onnx: are two ONNX graphs the same graph (networkx)
    runtime.py  ONNX Runtime sessions, run_onnx, check_parity, time_session
    fold.py     fold_onnx: the ONNX-level fold as file I/O (the rewrite rule is lora_fx.passes.onnx_fold_rule)
    kv_cache.py a decoder's KV cache as graph inputs and outputs (export_onnx(kv_cache=True))
    generate.py generate_onnx: greedy or sampled tokens from a KV-cache file, IO binding on the device
    genai.py    write_genai_config: genai_config.json beside a KV-cache file, for onnxruntime-genai

Names load lazily: importing lora_fx never imports onnx, onnxscript or onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "export_onnx": "export",
    "verify_onnx": "verify", "VerifyReport": "verify",
    "ort_session": "runtime", "run_onnx": "runtime", "check_parity": "runtime", "ParityReport": "runtime",
    "time_session": "runtime",
    "fold_onnx": "fold", "FoldOnnxReport": "fold",
    "generate_onnx": "generate",
    "write_genai_config": "genai",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lora_fx.onnx' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lora_fx.onnx.{home}"), name)


__all__ = sorted(_HOMES)
