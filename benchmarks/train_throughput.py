#!/usr/bin/env python
"""LoRA training throughput, side by side in one process (issue 7): lora_fx vs HF PEFT vs full fine-tuning.

    python benchmarks/train_throughput.py --out results.json            # the GPU run (about 1.1B params)
    python benchmarks/train_throughput.py --tiny --out /tmp/tiny.json   # CPU smoke test for CI (seconds)

Model: transformers LlamaForCausalLM built from a config with random weights (bf16 base), sdpa attention,
use_cache=False. Default: hidden 2048, 16 layers, 16 heads (head_dim 128), 8 kv heads, intermediate 8192, vocab 32000,
untied lm_head (Llama-3.2-1B's body with a Llama-2 vocabulary): about 1.1B parameters. Data: random token ids and
random labels; loss = cross-entropy on the logits, computed the same way for every variant.

Variants (each LoRA variant runs once per --targets entry: "qv" = q_proj,v_proj; "all" = every linear of the
decoder layers, lm_head excluded; r=16, alpha=32, dropout 0; A/B in fp32 as both libraries keep them):
  peft_eager, peft_compile          HF PEFT get_peft_model, eager / torch.compile
  lora_fx_eager, lora_fx_compile    lora_fx.adapt (torch.export front end), eager / torch.compile
  lora_fx_compile_recompute         lora_fx_compile with torch.compile's activation memory budget (--memory-budget):
                                    the partitioner recomputes cheap activations instead of saving them (opt-in)
  lora_fx_ckpt, lora_fx_ckpt_every2 lora_fx eager trained through lora_fx.checkpoint_layers(adapted, every=1 / 2):
                                    every (every other) decoder layer recomputes its activations in the backward
                                    pass (opt-in)
  peft_ckpt, full_ft_ckpt           PEFT / full FT with transformers' gradient checkpointing (non-reentrant), the
                                    peers' way to the same memory (opt-in)
  full_ft                           full fine-tuning: bf16 params, bf16 grads, AdamW states in bf16 (torchtune-style)
  full_ft_fp32master                full fine-tuning: fp32 params/grads/AdamW states, bf16 autocast (HF Trainer style)
  full_ft_compile                   full_ft under torch.compile (opt-in: not in the default list)
Every forward runs under torch.autocast(bf16); the optimizer is AdamW (fused on CUDA) on the trainable parameters.
torch.compile wraps forward + loss (one function); the optimizer step stays eager for every variant.

Per variant: --warmup steps (the first one includes compilation; its wall time is reported as first_step_s), then
--steps timed steps (CUDA events per step on GPU; perf_counter on CPU). Reported: tokens/s (batch*seq / median step
time), median and mean step time, peak GPU memory (torch.cuda.max_memory_allocated after reset_peak_memory_stats,
taken after the model is built: it includes weights, grads, optimizer state and activations), and MFU:
    FLOPs/step = 4*P_mm*T (frozen matmul weights: forward + input gradient)       [LoRA variants]
               + 6*P_lora*T (LoRA A and B: forward, input and weight gradients)  [LoRA variants]
               = 6*P_mm*T                                                        [full fine-tuning]
               + 2*2*L*T*seq*hidden*3 (QK^T and PV, forward + backward; the full square, causal not halved)
with P_mm = every matmul weight (decoder linears + lm_head; embeddings excluded), T = batch*seq tokens, over the bf16
matmul rate MEASURED in the same run (median of a timed --matmul-size^3 bf16 matmul on random data).

lora_fx operations (per target, model on the device): adapt wall time (trace via torch.export + inject), fold wall
time (first and median of --fold-reps, inplace=False) and fold throughput = bytes (each adapted W0 read + new W
written + A, B read) / time, against the measured device-to-device copy bandwidth (bytes read + written); the same
for fold's arithmetic alone (W0 + Σ deltas of every weight, without rebuilding the module). ONNX
export of the folded model only with --onnx (slow and large for a 1B model).

Robustness: every variant runs in try/except (the error is recorded, memory freed: del, gc.collect,
torch.cuda.empty_cache, torch._dynamo.reset); the JSON (--out) is rewritten after every variant, so a run killed
part way still leaves its numbers; a variant is not started when it would not end inside --budget-s.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py, run or imported
from common import import_lora_fx  # noqa: E402

QV = ("q_proj", "v_proj")
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_MODULES = {"qv": QV, "all": ALL_LINEARS}
TARGET_LABEL = {"qv": "q,v", "all": "all linears"}

# name: (implementation, compiled, takes a LoRA target)
VARIANTS = {
    "peft_eager": ("peft", False, True),
    "peft_compile": ("peft", True, True),
    "lora_fx_eager": ("lora_fx", False, True),
    "lora_fx_compile": ("lora_fx", True, True),
    "lora_fx_compile_recompute": ("lora_fx", True, True),  # torch.compile with an activation memory budget
    "lora_fx_ckpt": ("lora_fx", False, True),  # lora_fx.checkpoint_layers(every=1)
    "lora_fx_ckpt_every2": ("lora_fx", False, True),  # lora_fx.checkpoint_layers(every=2)
    "peft_ckpt": ("peft", False, True),  # transformers gradient checkpointing + PEFT
    "full_ft_ckpt": ("full_ft", False, False),  # transformers gradient checkpointing, full fine-tuning
    "full_ft": ("full_ft", False, False),
    "full_ft_fp32master": ("full_ft_fp32master", False, False),
    "full_ft_compile": ("full_ft", True, False),
    "lora_fx_fp8_eager": ("lora_fx", False, True),  # lora_fx.quantize_base(adapted, "fp8") after adapt (issue 18)
    "lora_fx_fp8_compile": ("lora_fx", True, True),
    "lora_fx_fp8fast_compile": ("lora_fx", True, True),  # ... with lora_fx.fp8.FAST_ACCUM_GRADIENTS = True
}
DEFAULT_VARIANTS = ("peft_eager", "lora_fx_eager", "full_ft", "full_ft_fp32master", "lora_fx_compile", "peft_compile")

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results as JSON to this file (rewritten after every variant)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny config on CPU, few steps, compile backend aot_eager: a smoke test that it runs")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma list from {sorted(VARIANTS)} (default: %(default)s)")
    p.add_argument("--targets", default=None, help="LoRA targets, comma list of qv, all (default qv,all; tiny qv)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; cpu with --tiny)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 1024; tiny 32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20; tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, incl. compilation (default 3; tiny 2)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; tiny aot_eager)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config KEY (dotted, e.g. coordinate_descent_tuning=True) for every "
                        "compiled variant; repeatable")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 bf16 matmul calibration (default 8192)")
    p.add_argument("--copy-mib", type=int, default=None, help="MiB copied for the bandwidth calibration (default 2048)")
    p.add_argument("--fold-reps", type=int, default=3, help="folds timed per target (default %(default)s)")
    p.add_argument("--onnx", action="store_true", help="also time lora_fx.export_onnx of the folded model")
    p.add_argument("--memory-budget", type=float, default=0.5,
                   help="activation_memory_budget of the *_recompute variants (default %(default)s)")
    p.add_argument("--profile-rows", type=int, default=20, help="rows of the --profile table (default 20)")
    p.add_argument("--profile", action="store_true",
                   help="profile 2 extra steps per variant (torch.profiler); top ops go to the JSON and stdout")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="do not start a variant that would end after this many seconds from start (default 480)")
    p.add_argument("--compile-reserve-s", type=float, default=120.0,
                   help="time a compiled variant is assumed to need before one has been seen (default 120)")
    a = p.parse_args(argv)

    tiny = dict(batch=2, seq=32, steps=3, warmup=2, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64,
                vocab=128, compile_backend="aot_eager", matmul_size=256, copy_mib=16, targets="qv")
    full = dict(batch=8, seq=1024, steps=20, warmup=3, hidden=2048, layers=16, heads=16, kv_heads=8,
                intermediate=8192, vocab=32000, compile_backend="inductor", matmul_size=8192, copy_mib=2048,
                targets="qv,all")
    for k, v in (tiny if a.tiny else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.device is None:
        a.device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    if a.tiny and a.device == "cpu":
        torch.set_num_threads(1)  # a toy model: threads only add overhead (and CI machines are shared)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {sorted(VARIANTS)}")
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [t for t in a.targets if t not in TARGET_MODULES]
    if bad:
        p.error(f"unknown targets {bad}; choose from {sorted(TARGET_MODULES)}")
    if a.steps < 1 or a.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first warmup step compiles)")
    return a


# ------------------------------------------------------------------------------------------------ device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def allocated_gb(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else None


def time_fn(fn, device: torch.device, reps: int, warmup: int = 2) -> list[float]:
    """Seconds per call of fn. GPU: a CUDA event pair around each call, one synchronize after the last (no sync
    between calls, as in a real training loop); CPU: perf_counter around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def calibrate(device: torch.device, n: int, copy_mib: int) -> dict:
    """Measured ceilings: bf16 matmul FLOP/s (n^3, random data, two operand sets rotated) and D2D copy bytes/s."""
    g = torch.Generator(device=device).manual_seed(123)
    sets = [(torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g),
             torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)) for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    i = [0]

    def mm():
        a, b = sets[i[0] % 2]
        i[0] += 1
        torch.mm(a, b, out=out)

    mm_times = time_fn(mm, device, reps=20 if device.type == "cuda" else 3, warmup=3 if device.type == "cuda" else 1)
    mm_s = statistics.median(mm_times)
    # check the product against fp32 on a slice (a wrong result would make every MFU meaningless)
    a, b = sets[0]
    torch.mm(a, b, out=out)
    ref = a[:64].float() @ b.float()
    rel = ((out[:64].float() - ref).norm() / ref.norm()).item()
    del sets, out, a, b, ref
    numel = copy_mib * 2**20 // 4
    src = torch.rand(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    cp_times = time_fn(lambda: dst.copy_(src), device, reps=20 if device.type == "cuda" else 3)
    cp_s = statistics.median(cp_times)
    ok = torch.equal(dst, src)
    del src, dst
    free_memory(device)
    return {"matmul_n": n, "matmul_s_median": mm_s, "matmul_tflops": 2 * n**3 / mm_s / 1e12,
            "matmul_rel_err_vs_fp32": rel, "copy_bytes": 2 * numel * 4, "copy_s_median": cp_s,
            "copy_gbps": 2 * numel * 4 / cp_s / 1e9, "copy_ok": ok}


# ------------------------------------------------------------------------------------------------ model
def llama_config(a):
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=max(a.seq, 2048), use_cache=False, tie_word_embeddings=False,
                      attention_dropout=0.0, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0, checkpointing: bool = False):
    """Random-weight LlamaForCausalLM in `dtype`, built directly on `device` (falls back to CPU build + move);
    checkpointing=True turns on transformers' gradient checkpointing (non-reentrant)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    except Exception:
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def count_params(cfg) -> dict:
    """Parameter counts from a meta-device model: total, matmul weights (Linear incl. lm_head), embeddings."""
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in m.parameters())
    mm = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    emb = m.model.embed_tokens.weight.numel()
    return {"total": total, "matmul": mm, "embedding": emb, "other": total - mm - emb}


def flops_per_step(a, params: dict, lora_params: int, full: bool) -> float:
    T = a.batch * a.seq
    attn = 2 * 2 * a.layers * T * a.seq * a.hidden * 3
    if full:
        return 6 * params["matmul"] * T + attn
    return 4 * params["matmul"] * T + 6 * lora_params * T + attn


def make_batches(a, device: torch.device, n: int = 2, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device),
             torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)) for _ in range(n)]


def make_loss_fn(model, device_type: str):
    def loss_fn(ids, labels):
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            out = model(ids)
            logits = out.logits if hasattr(out, "logits") else out[0]
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return loss_fn


def sdpa_report(gm) -> dict:
    """How the traced graph calls SDPA: with a materialized mask or is_causal (flash attention needs the latter).
    Calls that lora_fx's causal-attention pass rewrote (causal_or_masked) run with is_causal=True."""
    n = masked = causal = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if getattr(node.target, "__name__", "") == "causal_or_masked":
            n, causal = n + 1, causal + 1
        elif "scaled_dot_product_attention" in str(node.target):
            n += 1
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            is_causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
            masked += mask is not None
            causal += bool(is_causal)
    return {"sdpa_calls": n, "sdpa_with_mask": masked, "sdpa_is_causal": causal}


# ------------------------------------------------------------------------------------------------ one training run
def run_training(a, name: str, model, params: list, device: torch.device, batches, flops: float,
                 trainable: int, compiled: bool | None = None) -> dict:
    """Warmup + timed steps of forward/backward/AdamW; returns the measured numbers. compiled: torch.compile the
    forward + loss (default: as VARIANTS says for `name`)."""
    loss_fn = make_loss_fn(model, device.type)
    compiled = VARIANTS[name][1] if compiled is None else compiled
    if compiled:
        loss_fn = torch.compile(loss_fn, backend=a.compile_backend, mode=a.compile_mode)
    opt = torch.optim.AdamW(params, lr=a.lr, fused=device.type == "cuda")
    step_no = [0]
    last = [None]

    def step():
        ids, labels = batches[step_no[0] % len(batches)]
        step_no[0] += 1
        loss = loss_fn(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last[0] = loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mem_start = allocated_gb(device)
    warm = []
    budget = contextlib.nullcontext()
    if name.endswith("_recompute"):  # compilation happens in the first step, inside the patch
        import torch._functorch.config as functorch_config
        budget = functorch_config.patch(activation_memory_budget=a.memory_budget)
    with budget:
        for _ in range(a.warmup):
            t = time.perf_counter()
            step()
            sync(device)
            warm.append(time.perf_counter() - t)
        sync(device)
        t_wall = time.perf_counter()
        times = time_fn(step, device, reps=a.steps, warmup=0)
        wall = time.perf_counter() - t_wall
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    final_loss = last[0].item()
    if not math.isfinite(final_loss):
        raise RuntimeError(f"loss is {final_loss} after training")
    med = statistics.median(times)
    tokens = a.batch * a.seq
    res = {
        "status": "ok", "tokens_per_step": tokens, "tokens_per_s": tokens / med, "step_s_median": med,
        "step_s_mean": statistics.fmean(times), "step_s_min": min(times), "step_s_max": max(times),
        "timed_wall_s": wall, "first_step_s": warm[0], "warmup_s": warm, "peak_mem_gb": peak,
        "mem_at_start_gb": mem_start, "flops_per_step": flops, "achieved_tflops": flops / med / 1e12,
        "trainable_params": trainable, "final_loss": final_loss,
    }
    if a.profile:
        res["profile"] = profile_steps(step, device, rows=a.profile_rows)
        print(f"--- profile {name}\n{res['profile']}", flush=True)
    opt.zero_grad(set_to_none=True)
    del opt, loss_fn, last
    return res


def profile_steps(step, device: torch.device, n: int = 2, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync(device)
    keys = ["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]
    for key in keys:
        with contextlib.suppress(Exception):
            return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=90)
    return prof.key_averages().table(row_limit=20)


# ------------------------------------------------------------------------------------------------ variants
def trainable_of(model) -> tuple[list, int]:
    ps = [p for p in model.parameters() if p.requires_grad]
    return ps, sum(p.numel() for p in ps)


def run_peft(a, name, target, cfg, device, batches, pinfo, calib) -> dict:
    from peft import LoraConfig, get_peft_model
    model = build_model(cfg, device, torch.bfloat16, checkpointing=name.endswith("_ckpt"))
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, bias="none",
                                             target_modules=list(TARGET_MODULES[target])))
    params, n = trainable_of(model)
    lora_dtypes = sorted({str(p.dtype) for p in params})
    try:
        res = run_training(a, name, model, params, device, batches, flops_per_step(a, pinfo, n, False), n)
    finally:
        del model, params
    res["lora_dtype"] = lora_dtypes
    return res


def run_full(a, name, cfg, device, batches, pinfo, calib) -> dict:
    impl = VARIANTS[name][0]
    dtype = torch.float32 if impl == "full_ft_fp32master" else torch.bfloat16
    model = build_model(cfg, device, dtype, checkpointing=name.endswith("_ckpt"))
    params, n = trainable_of(model)
    try:
        res = run_training(a, name, model, params, device, batches, flops_per_step(a, pinfo, n, True), n)
    finally:
        del model, params
    res["param_dtype"] = str(dtype)
    return res




def lora_fx_adapt(a, target, cfg, device, batches):
    lora_fx = import_lora_fx()
    model = build_model(cfg, device, torch.bfloat16)
    rule = lora_fx.Rule(name="|".join(TARGET_MODULES[target]), r=a.r, alpha=a.alpha)
    sync(device)
    t = time.perf_counter()
    adapted = lora_fx.adapt(model, rules=[rule], example_inputs=(batches[0][0],))
    sync(device)
    return model, adapted, time.perf_counter() - t


def lora_fx_fold_ops(a, adapted, device, calib, example) -> dict:
    """Fold wall time and throughput (bytes of W0 read + new W written + A, B read) vs the measured copy rate."""
    lora_fx = import_lora_fx()
    container = adapted.lora_fx
    nbytes = 0
    with torch.no_grad():
        for lora in container.values():
            lora.lora_B.normal_(0, 0.01)  # a trained adapter is never zero; time folding real values
            w = adapted.get_parameter(lora.weight_name)
            nbytes += 2 * w.numel() * w.element_size()
            nbytes += (lora.lora_A.numel() + lora.lora_B.numel()) * lora.lora_A.element_size()
    times = []
    folded = None
    for _ in range(max(1, a.fold_reps)):
        folded = None
        gc.collect()
        sync(device)
        t = time.perf_counter()
        folded = lora_fx.fold(adapted)
        sync(device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)

    def weights_only():  # the arithmetic of fold alone: W0 + Σ deltas per weight, without rebuilding the module
        for _name, _value in lora_fx.passes.fold.folded_weights(adapted):
            pass

    weights_s = statistics.median(time_fn(weights_only, device, reps=max(1, a.fold_reps), warmup=1))
    ops = {"fold_s_first": times[0], "fold_s_median": med, "fold_s_all": times, "fold_bytes": nbytes,
           "fold_gbps": nbytes / med / 1e9, "lora_modules": len(container),
           "fold_weights_s": weights_s, "fold_weights_gbps": nbytes / weights_s / 1e9}
    if calib.get("copy_gbps"):
        ops["fold_frac_of_copy_bw"] = ops["fold_gbps"] / calib["copy_gbps"]
        ops["fold_weights_frac_of_copy_bw"] = ops["fold_weights_gbps"] / calib["copy_gbps"]
    if a.onnx:
        try:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "merged.onnx")
                sync(device)
                t = time.perf_counter()
                lora_fx.export_onnx(folded, path, example_inputs=(example,))
                ops["onnx_export_s"] = time.perf_counter() - t
                ops["onnx_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        except Exception as e:
            ops["onnx_error"] = f"{type(e).__name__}: {str(e)[:500]}"
    del folded
    return ops


# ------------------------------------------------------------------------------------------------ ratios & report
def _get(results, variant, target):
    for r in results:
        if r["variant"] == variant and r.get("target") == target and r.get("status") == "ok":
            return r
    return None


def compute_ratios(results, targets) -> tuple[dict, list]:
    ratios, checks = {}, []

    def ratio(x, y, key):
        if x is None or y is None or not x.get(key) or not y.get(key):
            return None
        return x[key] / y[key]

    full = _get(results, "full_ft", None)
    full32 = _get(results, "full_ft_fp32master", None)
    full_c = _get(results, "full_ft_compile", None)
    for t in targets:
        fe, fc = _get(results, "lora_fx_eager", t), _get(results, "lora_fx_compile", t)
        fr = _get(results, "lora_fx_compile_recompute", t)
        pe, pc = _get(results, "peft_eager", t), _get(results, "peft_compile", t)
        ck, ck2, pk = (_get(results, v, t) for v in ("lora_fx_ckpt", "lora_fx_ckpt_every2", "peft_ckpt"))
        full_k = _get(results, "full_ft_ckpt", None)
        f8e, f8c = _get(results, "lora_fx_fp8_eager", t), _get(results, "lora_fx_fp8_compile", t)
        f8f = _get(results, "lora_fx_fp8fast_compile", t)
        r = {
            "lora_fx_fp8fast_compile_vs_peft_compile_tokens": ratio(f8f, pc, "tokens_per_s"),
            "lora_fx_fp8_compile_vs_peft_compile_tokens": ratio(f8c, pc, "tokens_per_s"),
            "lora_fx_fp8_compile_vs_lora_fx_compile_tokens": ratio(f8c, fc, "tokens_per_s"),
            "lora_fx_fp8_compile_vs_full_ft_tokens": ratio(f8c, full, "tokens_per_s"),
            "lora_fx_fp8_compile_vs_full_ft_compile_tokens": ratio(f8c, full_c, "tokens_per_s"),
            "lora_fx_fp8_eager_vs_lora_fx_eager_tokens": ratio(f8e, fe, "tokens_per_s"),
            "lora_fx_fp8_compile_vs_peft_compile_peak_mem": ratio(f8c, pc, "peak_mem_gb"),
            "lora_fx_vs_peft_eager_tokens": ratio(fe, pe, "tokens_per_s"),
            "lora_fx_vs_peft_compile_tokens": ratio(fc, pc, "tokens_per_s"),
            "lora_fx_compile_vs_peft_eager_tokens": ratio(fc, pe, "tokens_per_s"),
            "lora_fx_vs_peft_eager_peak_mem": ratio(fe, pe, "peak_mem_gb"),
            "lora_vs_full_ft_tokens": ratio(fe, full, "tokens_per_s"),
            "lora_compile_vs_full_ft_tokens": ratio(fc, full_c or full, "tokens_per_s"),
            "lora_vs_full_ft_peak_mem": ratio(fe, full, "peak_mem_gb"),
            "lora_vs_full_ft_fp32master_peak_mem": ratio(fe, full32, "peak_mem_gb"),
            "lora_recompute_vs_full_ft_peak_mem": ratio(fr, full, "peak_mem_gb"),
            "lora_recompute_vs_peft_compile_tokens": ratio(fr, pc, "tokens_per_s"),
            "lora_recompute_vs_full_ft_tokens": ratio(fr, full, "tokens_per_s"),
            "lora_ckpt_vs_full_ft_peak_mem": ratio(ck, full, "peak_mem_gb"),
            "lora_ckpt_vs_full_ft_tokens": ratio(ck, full, "tokens_per_s"),
            "lora_ckpt_every2_vs_full_ft_peak_mem": ratio(ck2, full, "peak_mem_gb"),
            "lora_ckpt_every2_vs_full_ft_tokens": ratio(ck2, full, "tokens_per_s"),
            "lora_fx_ckpt_vs_peft_ckpt_tokens": ratio(ck, pk, "tokens_per_s"),
            "lora_fx_ckpt_vs_peft_ckpt_peak_mem": ratio(ck, pk, "peak_mem_gb"),
            "lora_ckpt_vs_full_ft_ckpt_peak_mem": ratio(ck, full_k, "peak_mem_gb"),
            "lora_ckpt_vs_full_ft_ckpt_tokens": ratio(ck, full_k, "tokens_per_s"),
            "mfu_lora_fx_eager": fe and fe.get("mfu"), "mfu_lora_fx_compile": fc and fc.get("mfu"),
            "mfu_peft_eager": pe and pe.get("mfu"), "mfu_peft_compile": pc and pc.get("mfu"),
            "trainable_params_equal": None if (fe or fc) is None or (pe or pc) is None
            else (fe or fc)["trainable_params"] == (pe or pc)["trainable_params"],
        }
        ratios[t] = r
        best_mfu = max([x for x in (r["mfu_lora_fx_eager"], r["mfu_lora_fx_compile"]) if x] or [None],
                       key=lambda v: v or 0)
        for label, value, op, goal in (
                ("lora_fx / PEFT tokens/s, eager", r["lora_fx_vs_peft_eager_tokens"], ">=", 1.0),
                ("lora_fx / PEFT tokens/s, compiled", r["lora_fx_vs_peft_compile_tokens"], ">=", 1.3),
                ("LoRA / full FT tokens/s (lora_fx eager / full_ft)", r["lora_vs_full_ft_tokens"], ">=", 1.8),
                ("LoRA / full FT peak memory (lora_fx eager / full_ft)", r["lora_vs_full_ft_peak_mem"], "<=", 0.5),
                ("LoRA / full FT peak memory (lora_fx checkpoint_layers(every=2) / full_ft)",
                 r["lora_ckpt_every2_vs_full_ft_peak_mem"], "<=", 0.5),
                ("LoRA / full FT peak memory (lora_fx checkpoint_layers(every=1) / full_ft)",
                 r["lora_ckpt_vs_full_ft_peak_mem"], "<=", 0.5),
                ("MFU, best lora_fx variant", best_mfu, ">=", 0.45),
                ("lora_fx FP8 compiled / PEFT bf16 compiled tokens/s",
                 r["lora_fx_fp8_compile_vs_peft_compile_tokens"], ">=", 1.5),
                ("lora_fx FP8 compiled / bf16 full FT tokens/s (full_ft eager)",
                 r["lora_fx_fp8_compile_vs_full_ft_tokens"], ">=", 1.8),
                ("lora_fx FP8 compiled / bf16 full FT compiled tokens/s",
                 r["lora_fx_fp8_compile_vs_full_ft_compile_tokens"], ">=", 1.8)):
            met = None if value is None else (value >= goal if op == ">=" else value <= goal)
            checks.append({"target": t, "name": label, "value": value, "goal": f"{op} {goal}", "met": met,
                           "missed_by": None if value is None or met else abs(value - goal)})
    return ratios, checks


def fmt(v, spec=".3g", none="n/a"):
    if v is None:
        return none
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec)


def report(data) -> str:
    a, calib = data["args"], data.get("calibration") or {}
    lines = [f"## Training throughput: {data['meta'].get('device_name')}, "
             f"{data['meta']['params']['total']:,} params ({data['meta']['params']['total'] / 1e9:.2f}B), batch {a['batch']} x seq {a['seq']}, "
             f"LoRA r={a['r']} alpha={a['alpha']:g}",
             "",
             f"Measured ceilings: bf16 {calib.get('matmul_n')}^3 matmul {fmt(calib.get('matmul_tflops'), '.1f')} "
             f"TFLOP/s; device copy {fmt(calib.get('copy_gbps'), '.0f')} GB/s (read+write)",
             "",
             "| variant | LoRA on | tokens/s | step ms (median) | peak GB | MFU | trainable | 1st step s | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in data["results"]:
        tgt = TARGET_LABEL.get(r.get("target"), "-")
        if r.get("status") == "ok":
            lines.append(f"| {r['variant']} | {tgt} | {r['tokens_per_s']:,.0f} | {r['step_s_median'] * 1e3:.1f} | "
                         f"{fmt(r.get('peak_mem_gb'), '.2f')} | {fmt(r.get('mfu'), '.1%')} | "
                         f"{r['trainable_params']:,} | {r['first_step_s']:.1f} | ok |")
        else:
            err = (r.get("error") or "").splitlines()[0][:90] if r.get("error") else ""
            lines.append(f"| {r['variant']} | {tgt} | | | | | | | {r.get('status')}: {err.replace('|', '/')} |")
    targets = list(data["ratios"])
    lines += ["", "| ratio | " + " | ".join(TARGET_LABEL[t] for t in targets) + " |",
              "|---|" + "---:|" * len(targets)]
    rows = [("lora_fx / PEFT tokens/s, eager", "lora_fx_vs_peft_eager_tokens", ".2f"),
            ("lora_fx / PEFT tokens/s, compiled", "lora_fx_vs_peft_compile_tokens", ".2f"),
            ("lora_fx compiled / PEFT eager tokens/s", "lora_fx_compile_vs_peft_eager_tokens", ".2f"),
            ("lora_fx / PEFT peak memory, eager", "lora_fx_vs_peft_eager_peak_mem", ".2f"),
            ("LoRA / full FT tokens/s (eager)", "lora_vs_full_ft_tokens", ".2f"),
            ("LoRA compiled / full FT tokens/s", "lora_compile_vs_full_ft_tokens", ".2f"),
            ("LoRA / full FT peak memory (bf16 full FT)", "lora_vs_full_ft_peak_mem", ".2f"),
            ("LoRA / full FT peak memory (fp32-master full FT)", "lora_vs_full_ft_fp32master_peak_mem", ".2f"),
            ("LoRA compiled+recompute / full FT peak memory (bf16 full FT)", "lora_recompute_vs_full_ft_peak_mem", ".2f"),
            ("LoRA compiled+recompute / full FT tokens/s", "lora_recompute_vs_full_ft_tokens", ".2f"),
            ("lora_fx compiled+recompute / PEFT compiled tokens/s", "lora_recompute_vs_peft_compile_tokens", ".2f"),
            ("LoRA checkpoint_layers / full FT peak memory", "lora_ckpt_vs_full_ft_peak_mem", ".2f"),
            ("LoRA checkpoint_layers / full FT tokens/s", "lora_ckpt_vs_full_ft_tokens", ".2f"),
            ("LoRA checkpoint_layers(every=2) / full FT peak memory", "lora_ckpt_every2_vs_full_ft_peak_mem", ".2f"),
            ("LoRA checkpoint_layers(every=2) / full FT tokens/s", "lora_ckpt_every2_vs_full_ft_tokens", ".2f"),
            ("lora_fx checkpoint_layers / PEFT gradient checkpointing tokens/s",
             "lora_fx_ckpt_vs_peft_ckpt_tokens", ".2f"),
            ("lora_fx checkpoint_layers / PEFT gradient checkpointing peak memory",
             "lora_fx_ckpt_vs_peft_ckpt_peak_mem", ".2f"),
            ("LoRA checkpoint_layers / full FT with checkpointing, peak memory",
             "lora_ckpt_vs_full_ft_ckpt_peak_mem", ".2f"),
            ("LoRA checkpoint_layers / full FT with checkpointing, tokens/s",
             "lora_ckpt_vs_full_ft_ckpt_tokens", ".2f"),
            ("MFU lora_fx eager", "mfu_lora_fx_eager", ".1%"), ("MFU lora_fx compiled", "mfu_lora_fx_compile", ".1%"),
            ("MFU PEFT eager", "mfu_peft_eager", ".1%"), ("MFU PEFT compiled", "mfu_peft_compile", ".1%"),
            ("same trainable params (lora_fx, PEFT)", "trainable_params_equal", "")]
    for label, key, spec in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(data["ratios"][t].get(key), spec) for t in targets) + " |")
    lines += ["", "| target (issue 7) | LoRA on | value | goal | met | missed by |", "|---|---|---:|---|---|---:|"]
    for c in data["checks"]:
        spec = ".1%" if c["name"].startswith("MFU") else ".2f"
        lines.append(f"| {c['name']} | {TARGET_LABEL[c['target']]} | {fmt(c['value'], spec)} | {c['goal']} | "
                     f"{fmt(c['met'])} | {fmt(c['missed_by'], spec, '')} |")
    if data["ops"]:
        lines += ["", "| lora_fx op | LoRA on | adapt s | fold s (first / median) | fold GB/s | of copy BW | "
                      "fold arithmetic s | its GB/s | of copy BW | ONNX export s | SDPA masked / calls |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for o in data["ops"]:
            onnx = fmt(o.get("onnx_export_s"), ".1f", "error" if o.get("onnx_error") else "not run")
            lines.append(f"| {o.get('when', '')} | {TARGET_LABEL[o['target']]} | {fmt(o.get('adapt_s'), '.2f')} | "
                         f"{fmt(o.get('fold_s_first'), '.3f', '-')} / {fmt(o.get('fold_s_median'), '.3f', '-')} | "
                         f"{fmt(o.get('fold_gbps'), '.3g', '-')} | {fmt(o.get('fold_frac_of_copy_bw'), '.1%', '-')} | "
                         f"{fmt(o.get('fold_weights_s'), '.4f', '-')} | {fmt(o.get('fold_weights_gbps'), '.3g', '-')} | "
                         f"{fmt(o.get('fold_weights_frac_of_copy_bw'), '.1%', '-')} | {onnx} | {o.get('sdpa_with_mask', '?')} / {o.get('sdpa_calls', '?')} |")
    notes = data.get("notes") or []
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "lora_fx"):
        try:
            m = import_lora_fx() if mod == "lora_fx" else __import__(mod)
            out[mod] = m.__version__
            if mod == "lora_fx":
                out["lora_fx_path"] = os.path.dirname(m.__file__)
        except Exception as e:
            out[mod] = f"unavailable ({type(e).__name__})"
    return out


def write_json(path: str | None, data: dict) -> None:
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".train_throughput.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ main
def set_inductor_options(options: list[str]) -> None:
    """--inductor KEY=VALUE: the same torch._inductor.config setting for every compiled variant (peer included)."""
    import ast

    import torch._inductor.config as inductor_config
    for option in options:
        key, _, value = option.partition("=")
        *parents, leaf = key.split(".")
        target = inductor_config
        for name in parents:
            target = getattr(target, name)
        getattr(target, leaf)  # an unknown key fails here, before any variant runs
        setattr(target, leaf, ast.literal_eval(value))


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    set_inductor_options(a.inductor)
    cfg = llama_config(a)
    pinfo = count_params(cfg)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cuda": torch.version.cuda, "versions": versions(), "params": pinfo,
            "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads")},
            "precision": "base weights bf16; LoRA A/B fp32; forward under torch.autocast(bf16); AdamW (fused on "
                         "CUDA). full_ft: bf16 params/grads/AdamW states; full_ft_fp32master: fp32 "
                         "params/grads/states with bf16 autocast",
            "flops": "LoRA: 4*P_mm*T + 6*P_lora*T + 12*L*T*seq*hidden; full FT: 6*P_mm*T + 12*L*T*seq*hidden; "
                     "P_mm = decoder linears + lm_head"}
    data = {"meta": meta, "args": vars(a), "calibration": None, "results": [], "ops": [], "ratios": {},
            "checks": [], "notes": []}
    log(f"model: {pinfo['total'] / 1e9:.3f}B params ({pinfo['matmul'] / 1e9:.3f}B in matmul weights), "
        f"config {meta['config']}, batch {a.batch} x seq {a.seq}, device {meta['device_name']}")
    log(f"versions: {meta['versions']}")

    try:
        data["calibration"] = calibrate(device, a.matmul_size, a.copy_mib)
        c = data["calibration"]
        log(f"calibration: bf16 matmul {c['matmul_tflops']:.1f} TFLOP/s (rel err {c['matmul_rel_err_vs_fp32']:.1e}), "
            f"copy {c['copy_gbps']:.0f} GB/s")
    except Exception as e:
        data["calibration"] = {"error": f"{type(e).__name__}: {e}"}
        log(f"calibration failed: {e}")
    write_json(a.out, data)
    batches = make_batches(a, device)

    peft_ok = True
    try:
        import peft  # noqa: F401
    except Exception as e:
        peft_ok = False
        data["notes"].append(f"peft not importable ({type(e).__name__}): PEFT variants skipped")

    # Order: the eager comparisons first (cheap), compiled ones last (compilation dominates the run time).
    plan = []
    first = a.targets[0] if a.targets else None
    for t in a.targets:
        plan += [(v, t) for v in ("peft_eager", "lora_fx_eager", "peft_ckpt", "lora_fx_ckpt", "lora_fx_ckpt_every2",
                                  "lora_fx_fp8_eager") if v in a.variants]
        if t == first:
            plan += [(v, None) for v in ("full_ft", "full_ft_fp32master", "full_ft_ckpt") if v in a.variants]
    if not a.targets:
        plan += [(v, None) for v in ("full_ft", "full_ft_fp32master", "full_ft_ckpt") if v in a.variants]
    for t in a.targets:
        plan += [(v, t) for v in ("lora_fx_compile", "peft_compile", "lora_fx_compile_recompute",
                                  "lora_fx_fp8_compile", "lora_fx_fp8fast_compile") if v in a.variants]
    if "full_ft_compile" in a.variants:
        plan.append(("full_ft_compile", None))

    compile_seen: list[float] = []  # wall time of each variant run so far, to predict the next one
    eager_seen: list[float] = []
    for name, target in plan:
        impl, compiled, _ = VARIANTS[name]
        rec = {"variant": name, "target": target}
        elapsed = time.perf_counter() - T0
        seen = compile_seen if compiled else eager_seen
        need = max(seen) if seen else (a.compile_reserve_s if compiled else 30.0 if device.type == "cuda" else 5.0)
        if elapsed + need > a.budget_s:
            rec.update(status="skipped", error=f"time budget: {elapsed:.0f}s elapsed + ~{need:.0f}s needed > "
                                               f"--budget-s {a.budget_s:.0f}")
            data["results"].append(rec)
            log(f"{name} [{target}] skipped: {rec['error']}")
            continue
        if impl == "peft" and not peft_ok:
            rec.update(status="skipped", error="peft not installed")
            data["results"].append(rec)
            continue
        log(f"{name} [{TARGET_LABEL.get(target, 'all params')}] ...")
        free_memory(device)
        rec["mem_before_gb"] = allocated_gb(device)
        t_var = time.perf_counter()
        try:
            if impl == "peft":
                rec.update(run_peft(a, name, target, cfg, device, batches, pinfo, data["calibration"]))
            elif impl.startswith("full_ft"):
                rec.update(run_full(a, name, cfg, device, batches, pinfo, data["calibration"]))
            else:
                ops = {"target": target, "when": name}
                try:
                    model, adapted, ops["adapt_s"] = lora_fx_adapt(a, target, cfg, device, batches)
                    lora_fx = import_lora_fx()
                    ops.update(sdpa_report(lora_fx.graph(adapted)))
                    params = list(lora_fx.lora_parameters(adapted))
                    n = sum(p.numel() for p in params)
                    _, n_all = trainable_of(adapted)
                    if n_all != n:
                        raise RuntimeError(f"{n_all} trainable parameters but {n} LoRA parameters")
                    trained = adapted
                    if "_fp8" in name:  # the frozen matmuls on FP8 tensor cores, the LoRA in bf16
                        import lora_fx.fp8
                        lora_fx.fp8.FAST_ACCUM_GRADIENTS = "_fp8fast" in name
                        quantized = lora_fx.quantize_base(adapted, "fp8", which="all")
                        rec["quantized_weights"] = len(quantized.quantized)
                    if "_ckpt" in name:  # a training view over the same parameters; fold etc. take `adapted`
                        trained = lora_fx.checkpoint_layers(adapted, every=2 if name.endswith("every2") else 1)
                        rec["checkpointed_layers"] = len(trained.checkpointed)
                    rec.update(run_training(a, name, trained, params, device, batches,
                                            flops_per_step(a, pinfo, n, False), n))
                    rec["lora_dtype"] = sorted({str(p.dtype) for p in params})
                    del params, trained
                    if name == "lora_fx_eager":  # fold (+ export) once per target, on the eager run's module
                        ops.update(lora_fx_fold_ops(a, adapted, device, data["calibration"] or {}, batches[0][0]))
                finally:
                    data["ops"].append(ops)
                    with contextlib.suppress(NameError):
                        del model, adapted
            cal = data["calibration"] or {}
            if rec.get("status") == "ok" and cal.get("matmul_tflops"):
                rec["mfu"] = rec["achieved_tflops"] / cal["matmul_tflops"]
            log(f"{name} [{TARGET_LABEL.get(target, 'all params')}]: {rec['tokens_per_s']:,.0f} tokens/s, "
                f"step {rec['step_s_median'] * 1e3:.1f} ms, peak {fmt(rec.get('peak_mem_gb'), '.2f')} GB, "
                f"MFU {fmt(rec.get('mfu'), '.1%')}, first step {rec['first_step_s']:.1f}s")
        except Exception as e:
            rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:2000]}",
                       traceback=traceback.format_exc()[-4000:])
            log(f"{name} [{target}] FAILED: {type(e).__name__}: {str(e)[:300]}")
        finally:
            rec["variant_wall_s"] = time.perf_counter() - t_var
            (compile_seen if compiled else eager_seen).append(rec["variant_wall_s"])
            data["results"].append(rec)
            free_memory(device)
            data["ratios"], data["checks"] = compute_ratios(data["results"], a.targets)
            write_json(a.out, data)

    for o in data["ops"]:
        if o.get("sdpa_with_mask"):
            data["notes"].append(
                f"lora_fx graph ({TARGET_LABEL[o['target']]}): {o['sdpa_with_mask']} of {o['sdpa_calls']} SDPA calls "
                "carry a materialized mask (torch.export makes transformers build the causal mask), so they cannot "
                "take the flash kernel; HF/PEFT eager calls SDPA with is_causal=True and no mask")
            break
    if device.type == "cpu":
        data["notes"].append("CPU run: a smoke test; MFU against a small single-thread matmul means nothing here")
    leaks = [f"{r['variant']}[{r.get('target')}] {r['mem_before_gb']:.2f} GB" for r in data["results"]
             if (r.get("mem_before_gb") or 0) > 0.1]
    if leaks:
        data["notes"].append("memory still allocated when a variant started (a leak from the one before inflates its "
                             "peak): " + ", ".join(leaks))
    data["notes"].append("full_ft = bf16 params, grads and AdamW states (no fp32 master); full_ft_fp32master = fp32 "
                         "params, grads and states under bf16 autocast. Ratios use full_ft unless named.")
    data["total_wall_s"] = time.perf_counter() - T0
    write_json(a.out, data)
    print()
    print(report(data))
    print(f"\ntotal wall time {data['total_wall_s']:.0f}s" + (f"; JSON: {a.out}" if a.out else ""))
    ok = [r for r in data["results"] if r.get("status") == "ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
