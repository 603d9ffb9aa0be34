#!/usr/bin/env python
"""QLoRA training, side by side in one process (issue 18): lora_fx NF4 base vs PEFT + bitsandbytes NF4 base.

    python benchmarks/qlora_train.py --out results.json                 # the GPU run (Llama-3-8B shape)
    python benchmarks/qlora_train.py --tiny --out /tmp/tiny.json        # a smoke test (small model)

Model: transformers LlamaForCausalLM from a config with random bf16 weights, Llama-3-8B's shape by default (hidden
4096, 32 layers, 32 heads / 8 KV heads, intermediate 14336, vocab 128256, untied lm_head: 8.0B parameters). LoRA
r=16, alpha=32, dropout 0 on every linear of the decoder layers (q, k, v, o, gate, up, down; lm_head excluded and
left in bf16 by both, as PEFT's QLoRA does), A/B in fp32. Every forward under torch.autocast(bf16); AdamW (fused)
on the LoRA parameters; gradient checkpointing on for both (every decoder layer keeps only its inputs).

Variants:
  peft_bnb             the linears become bitsandbytes Linear4bit (NF4, double quantization, bf16 compute), then
                       PEFT get_peft_model; transformers' gradient checkpointing (non-reentrant); eager
  peft_bnb_compile     the same under torch.compile (opt-in)
  lora_fx_nf4          lora_fx.adapt -> lora_fx.quantize_base(adapted, "nf4") (torchao NF4, double quantization)
                       -> lora_fx.checkpoint_layers(adapted); eager
  lora_fx_nf4_compile  the same under torch.compile
  lora_fx_nf4_loftq[_compile]  either, with quantize_base(..., lora_init="loftq") (the LoRAs start at the
                       quantization error; quantize_s then includes the SVDs; opt-in)
Per variant: --warmup untimed steps (the first compiles), --steps timed steps (CUDA events); tokens/s from the
median step; peak memory = torch.cuda.max_memory_allocated from just before the first step (weights, LoRA, AdamW
states, activations, the dequantized weight in flight). Also a micro-benchmark of one quantized matmul
(x·dequant(W)ᵀ, forward and input gradient) at the 8B's shapes: torchao NF4 compiled vs bitsandbytes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402  (model, batches, timing and training loop)
from common import import_lora_fx  # noqa: E402

VARIANTS = {  # name: (implementation, compiled)
    "peft_bnb": ("peft", False),
    "peft_bnb_compile": ("peft", True),
    "lora_fx_nf4": ("lora_fx", False),
    "lora_fx_nf4_compile": ("lora_fx", True),
    "lora_fx_nf4_loftq": ("lora_fx", False),
    "lora_fx_nf4_loftq_compile": ("lora_fx", True),
}
DEFAULT_VARIANTS = ("peft_bnb", "lora_fx_nf4_compile", "lora_fx_nf4")
LINEARS = tt.ALL_LINEARS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--tiny", action="store_true", help="a small model, for a smoke test")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--batch", type=int, default=None, help="default 4 (tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (tiny 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, incl. compilation (default 3; tiny 1)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--budget-s", type=float, default=540.0, help="skip a variant that would end after this")
    a = p.parse_args(argv)
    big = dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)
    small = dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=1024)
    for k, v in (small if a.tiny else big).items():
        setattr(a, k, v)
    for k, big_v, tiny_v in (("batch", 4, 2), ("seq", 2048, 64), ("steps", 8, 2), ("warmup", 3, 1)):
        if getattr(a, k) is None:
            setattr(a, k, tiny_v if a.tiny else big_v)
    a.variants = [v for v in a.variants.split(",") if v]
    a.compile_backend, a.compile_mode, a.profile = "inductor", None, False
    return a


def to_bnb_4bit(model: nn.Module, names: tuple[str, ...]) -> int:
    """Replace the named nn.Linear children by bitsandbytes Linear4bit (NF4, double quantization, bf16 compute),
    quantizing each bf16 weight on the GPU; what transformers' BitsAndBytesConfig(load_in_4bit) builds."""
    import bitsandbytes as bnb

    n = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in names:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(child.weight.device)
                setattr(module, child_name, q)
                n += 1
    return n


def run_peft(a, name, cfg, device, batches, flops) -> dict:
    from peft import LoraConfig, get_peft_model

    model = tt.build_model(cfg, device, torch.bfloat16, checkpointing=True)
    quantized = to_bnb_4bit(model, LINEARS)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, bias="none",
                                             target_modules=list(LINEARS)))
    params, n = tt.trainable_of(model)
    tt.free_memory(device)
    try:
        res = tt.run_training(a, name, model, params, device, batches, flops(n), n, compiled=VARIANTS[name][1])
    finally:
        del model, params
    res["quantized_weights"] = quantized
    return res


def run_lora_fx(a, name, cfg, device, batches, flops) -> dict:
    lora_fx = import_lora_fx()
    model = tt.build_model(cfg, device, torch.bfloat16)
    t = time.perf_counter()
    adapted = lora_fx.adapt(model, rules=[lora_fx.Rule(name="|".join(LINEARS), r=a.r, alpha=a.alpha)],
                            example_inputs=(batches[0][0],))
    tt.sync(device)
    adapt_s = time.perf_counter() - t
    t = time.perf_counter()
    report = lora_fx.quantize_base(adapted, "nf4", lora_init="loftq" if "_loftq" in name else "keep")
    tt.sync(device)
    quantize_s = time.perf_counter() - t
    view = lora_fx.checkpoint_layers(adapted)
    params = list(lora_fx.lora_parameters(adapted))
    n = sum(p.numel() for p in params)
    del model
    tt.free_memory(device)
    try:
        res = tt.run_training(a, name, view, params, device, batches, flops(n), n, compiled=VARIANTS[name][1])
    finally:
        del view, adapted, params
    res.update(adapt_s=adapt_s, quantize_s=quantize_s, quantized_weights=len(report.quantized),
               quantized_mib_before=report.bytes_before / 2**20, quantized_mib_after=report.bytes_after / 2**20,
               loftq_error_removed=(sum(report.error_removed.values()) / len(report.error_removed)
                                    if report.error_removed else None))
    return res


def matmul_micro(a, device) -> dict:
    """One frozen matmul at the model's shapes, forward + input gradient: torchao NF4 (compiled, as lora_fx runs
    it) vs bitsandbytes (as PEFT runs it) vs plain bf16. Milliseconds, median of CUDA-event timings."""
    from lora_fx import nf4

    out = {}
    tokens = a.batch * a.seq
    for label, (n_out, n_in) in {"up (14336x4096)": (a.intermediate, a.hidden),
                                 "down (4096x14336)": (a.hidden, a.intermediate)}.items():
        w = torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16) * 0.02
        x = torch.randn(tokens, n_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(tokens, n_out, device=device, dtype=torch.bfloat16)
        row = {}
        q = nf4.quantize(w)
        fn_ao = torch.compile(lambda x: nf4.linear(x, q, None))
        cases = {"bf16": lambda x: x @ w.t(), "torchao_nf4_compiled": fn_ao}
        try:
            import bitsandbytes as bnb
            qb = bnb.nn.Params4bit(w.data, requires_grad=False, compress_statistics=True, quant_type="nf4").to(device)
            cases["bnb_nf4"] = lambda x: bnb.matmul_4bit(x, qb.t(), quant_state=qb.quant_state)
        except Exception as e:
            row["bnb_error"] = f"{type(e).__name__}: {e}"
        for case, fn in cases.items():
            def step(fn=fn):
                x.grad = None
                fn(x).backward(g)
            times = tt.time_fn(step, device, reps=10, warmup=3)
            row[case + "_ms"] = statistics.median(times) * 1e3
        out[label] = row
        del w, x, g, q
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = tt.llama_config(a)
    pinfo = tt.count_params(cfg)
    flops = lambda n: tt.flops_per_step(a, pinfo, n, False) + 2 * pinfo["matmul"] * a.batch * a.seq  # + recompute
    data = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "versions": tt.versions(), "params": pinfo,
                     "config": {k: getattr(a, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate",
                                                          "vocab", "batch", "seq", "r", "alpha")}},
            "results": [], "ratios": {}, "micro": None}
    for mod in ("bitsandbytes", "torchao"):
        try:
            data["meta"]["versions"][mod] = __import__(mod).__version__
        except Exception as e:
            data["meta"]["versions"][mod] = f"unavailable ({type(e).__name__}: {e})"
    tt.log(f"model {pinfo['total'] / 1e9:.2f}B params, batch {a.batch} x seq {a.seq}, {data['meta']['versions']}")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device),
                torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)) for _ in range(2)]
    for name in a.variants:
        rec = {"variant": name}
        if time.perf_counter() - tt.T0 > a.budget_s:
            rec.update(status="skipped", error="time budget")
            data["results"].append(rec)
            continue
        tt.log(f"{name} ...")
        t = time.perf_counter()
        try:
            run = run_peft if VARIANTS[name][0] == "peft" else run_lora_fx
            rec.update(run(a, name, cfg, device, batches, flops))
            tt.log(f"{name}: {rec['tokens_per_s']:,.0f} tokens/s, step {rec['step_s_median'] * 1e3:.0f} ms, "
                   f"peak {rec.get('peak_mem_gb') or 0:.2f} GB, first step {rec['first_step_s']:.1f}s, "
                   f"loss {rec['final_loss']:.3f}")
        except Exception as e:
            rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:1500]}",
                       traceback=traceback.format_exc()[-3000:])
            tt.log(f"{name} FAILED: {rec['error'][:300]}")
        rec["variant_wall_s"] = time.perf_counter() - t
        data["results"].append(rec)
        tt.free_memory(device)
        ok = {r["variant"]: r for r in data["results"] if r.get("status") == "ok"}
        base = ok.get("peft_bnb")
        data["ratios"] = {f"{v}_vs_peft_bnb": {"tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"],
                                               "peak_mem": (r["peak_mem_gb"] / base["peak_mem_gb"]
                                                            if r.get("peak_mem_gb") else None)}
                          for v, r in ok.items() if base is not None and v != "peft_bnb"}
        tt.write_json(a.out, data)
    if device.type == "cuda" and time.perf_counter() - tt.T0 < a.budget_s:
        try:
            data["micro"] = matmul_micro(a, device)
        except Exception as e:
            data["micro"] = {"error": f"{type(e).__name__}: {e}"}
    data["total_wall_s"] = time.perf_counter() - tt.T0
    tt.write_json(a.out, data)
    print(json.dumps({"ratios": data["ratios"], "micro": data["micro"]}, indent=1))
    return 0 if any(r.get("status") == "ok" for r in data["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
