#!/usr/bin/env python
"""Inference latency of base, merged and unmerged-LoRA models, side by side in one run (issue 5).

    python benchmarks/onnx_latency.py --out onnx_latency.json            # the GPU run (CUDA; ~7-9 min, estimated)
    python benchmarks/onnx_latency.py --tiny --out /tmp/tiny.json        # CPU smoke test (tiny configs, minutes)

Models (random weights, built from configs, no download): a BERT-base-sized encoder (transformers BertModel, hidden
768, 12 layers, 12 heads, intermediate 3072, vocab 30522, outputs last_hidden_state and pooler_output) and a
GPT-2-small-sized decoder (GPT2LMHeadModel, 768/12/12, vocab 50257, lm_head tied to the embedding, use_cache=False,
outputs the logits). Input: random token ids only. Shapes: batch 1 x seq 128 and batch 32 x seq 512.

Variants, per model and dtype (fp16 and fp32; fp32 runs fewer unmerged variants, see --fp32-ranks/--fp32-targets):
  base             the model as built
  base_again       a SECOND ONNX Runtime session of the same base file (eager: the same module timed again): the
                   noise floor; ratio base_again/base is what "1.00 within noise" means
  merged           lora_fx.adapt (all linears, r=8) -> random B -> lora_fx.fold -> export (the deployment path)
  onnx_folded      the unmerged all-linears r=8 ONNX folded by lora_fx.fold_onnx (no PyTorch)
  unmerged_T_rR    the adapted model exported without folding: LoRA branches (x·Aᵀ)·Bᵀ·s beside each adapted
                   linear; T = qv (BERT query,value; GPT-2 c_attn, its fused q,k,v projection) or all (every linear,
                   GPT-2's tied lm_head excluded), R = rank (8 and 64). LoRA weights in the model's dtype.
  The qv files are made from the all-linears export by folding every branch except q,v (fold_onnx(keep=...)):
  the same graph as exporting a q,v adapter, one export less each.

Every ONNX file is exported by lora_fx.export_onnx(dynamic=True) (one file serves both shapes) from CPU, in parallel
worker processes (--jobs). verify_onnx checks merged and onnx_folded against base (structure IDENTICAL expected).

ONNX Runtime: one InferenceSession per variant, all with the same SessionOptions (ORT_ENABLE_ALL) and providers
(CUDAExecutionProvider, CPU fallback refused with --device cuda), timed by lora_fx.onnx.runtime.time_session (IO binding
on CUDA: inputs and outputs stay on the GPU, each run synchronised). Runs alternate between variants: --rounds
rounds, each times every variant for --iters runs in a rotated order, so drift spreads evenly; medians are reported.
Node counts after ORT's graph optimizations: the sessions of base, merged and unmerged_all_r8 also write their
optimized graph (SessionOptions.optimized_model_filepath; it does not change how the session runs) and the nodes
are counted per op type (fused ops such as com.microsoft::Attention / SkipLayerNormalization / FastGelu included).

PyTorch eager: base module, lora_fx.fold'ed module, adapted (unmerged) modules, on the same device and dtype under
torch.no_grad, timed the same way (alternating rounds, synchronised runs, medians).

Output: markdown tables on stdout, everything as JSON in --out (rewritten after each model/dtype group), the total
run time at the end.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import gc
import io
import json
import multiprocessing
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py, run or imported
from common import import_lora_fx  # noqa: E402

T0 = time.perf_counter()

FULL = {
    "bert": dict(),  # transformers' BertConfig defaults are BERT-base
    "gpt2": dict(use_cache=False),  # GPT2Config defaults are GPT-2 small
}
TINY = {
    "bert": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64),
    "gpt2": dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2, use_cache=False),
}
QV = {"bert": "query|value", "gpt2": "c_attn"}  # rule name / keep pattern of the q,v target
MERGE_RANK = 8  # rank of the adapter behind merged / onnx_folded (--merge-rank; tiny: 4)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--tiny", action="store_true", help="tiny configs, CPU, short shapes and few runs: a smoke test")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--models", default="bert,gpt2", help="comma list of bert, gpt2 (default %(default)s)")
    p.add_argument("--dtypes", default=None, help="comma list of fp16, fp32 (default fp16,fp32; tiny: fp32)")
    p.add_argument("--shapes", default=None, help="comma list of BATCHxSEQ (default 1x128,32x512; tiny 1x16,2x32)")
    p.add_argument("--ranks", default=None, help="unmerged ranks in fp16 (default 8,64; tiny 4,8)")
    p.add_argument("--targets", default="qv,all", help="unmerged targets in fp16 (default %(default)s)")
    p.add_argument("--fp32-ranks", default=None, help="unmerged ranks in fp32 (default 8; tiny 4)")
    p.add_argument("--fp32-targets", default="qv,all", help="unmerged targets in fp32 (default %(default)s)")
    p.add_argument("--merge-rank", type=int, default=None, help="rank of the merged adapter (default 8; tiny 4)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5; tiny 2)")
    p.add_argument("--iters", type=int, default=None,
                   help="max timed runs per variant and round (default 10; tiny 2); fewer (at least 3) when one run "
                        "takes longer than --block-s / iters")
    p.add_argument("--block-s", type=float, default=0.15, help="target seconds per variant and round (default %(default)s)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no new ORT/eager group after this many seconds of run time (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per variant and shape first (default 3)")
    p.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager timings")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel export/fold worker processes (default min(12, cores - 2); 1 runs them inline)")
    p.add_argument("--workdir", default=None, help="where the ONNX files go (default: a temporary directory)")
    p.add_argument("--keep-files", action="store_true", help="keep the ONNX files (default: delete at the end)")
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.tiny else "cuda")
    a.models = [m for m in a.models.split(",") if m]
    a.dtypes = (a.dtypes or ("fp32" if a.tiny else "fp16,fp32")).split(",")
    a.shapes = [tuple(int(v) for v in s.split("x")) for s in (a.shapes or ("1x16,2x32" if a.tiny else "1x128,32x512")).split(",")]
    a.ranks = [int(r) for r in (a.ranks or ("4,8" if a.tiny else "8,64")).split(",")]
    a.fp32_ranks = [int(r) for r in (a.fp32_ranks or ("4" if a.tiny else "8")).split(",")]
    a.targets = [t for t in a.targets.split(",") if t]
    a.fp32_targets = [t for t in a.fp32_targets.split(",") if t]
    a.merge_rank = a.merge_rank or (4 if a.tiny else MERGE_RANK)
    a.rounds = a.rounds or (2 if a.tiny else 5)
    a.iters = a.iters or (2 if a.tiny else 10)
    a.jobs = a.jobs or max(1, min(12, (os.cpu_count() or 2) - 2))
    for m in a.models:
        if m not in FULL:
            p.error(f"unknown model {m!r} (bert, gpt2)")
    for d in a.dtypes:
        if d not in ("fp16", "fp32"):
            p.error(f"unknown dtype {d!r} (fp16, fp32)")
    for t in a.targets + a.fp32_targets:
        if t not in ("qv", "all"):
            p.error(f"unknown target {t!r} (qv, all)")
    return a


# ------------------------------------------------------------------------------------------------ shared helpers


DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def build_model(name: str, tiny: bool, dtype: str, device: str) -> torch.nn.Module:
    """The model from its config, with seeded random weights: every process builds the same weights."""
    import transformers
    torch.manual_seed(0)
    config = (TINY if tiny else FULL)[name]
    if name == "bert":
        model = transformers.BertModel(transformers.BertConfig(**config))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def vocab(name: str, tiny: bool) -> int:
    return 128 if tiny else (30522 if name == "bert" else 50257)


def token_ids(name: str, tiny: bool, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab(name, tiny), (batch, seq), generator=g)


def adapt_variant(lora_fx, model, name: str, target: str, r: int, dtype: str, example: torch.Tensor):
    """lora_fx.adapt on `target` at rank r, then seeded random B (so the fold changes W) in the model's dtype."""
    rules = None if target == "all" else [lora_fx.Rule(name=QV[name], r=r, alpha=2 * r)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rules=None skips GPT-2's tied lm_head with a warning: intended
        adapted = lora_fx.adapt(model, rules, example_inputs=(example,), r=r, alpha=2 * r, frontend="export")
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.02)
            lora.to(DTYPES[dtype])  # LoRA in the model's dtype: no Cast nodes in the unmerged graph
    return adapted


def onnx_nodes(path) -> int:
    import onnx
    return len(onnx.load(str(path), load_external_data=False).graph.node)


# ------------------------------------------------------------------------------------------------ worker jobs
def export_job(spec: dict) -> dict:
    """Build (and adapt / fold) one variant on CPU and export it; runs in a worker process or inline."""
    torch.set_num_threads(spec.get("threads", 2))
    out = {"variant": spec["variant"], "path": spec["path"]}
    try:
        lora_fx = import_lora_fx()
        t = time.perf_counter()
        model = build_model(spec["model"], spec["tiny"], spec["dtype"], "cpu")
        example = token_ids(spec["model"], spec["tiny"], 2, 16)
        kind = spec["variant"]
        if kind == "base":
            module = model
        elif kind == "merged":
            module = lora_fx.fold(adapt_variant(lora_fx, model, spec["model"], "all", spec["merge_rank"], spec["dtype"], example))
        else:  # unmerged_<target>_r<r>
            _, target, rank = kind.split("_")
            module = adapt_variant(lora_fx, model, spec["model"], target, int(rank[1:]), spec["dtype"], example)
        out["prepare_s"] = time.perf_counter() - t
        t = time.perf_counter()
        lora_fx.export_onnx(module, spec["path"], (example,), dynamic=True)
        out["export_s"] = time.perf_counter() - t
        out["nodes"] = onnx_nodes(spec["path"])
        out["bytes"] = os.path.getsize(spec["path"])
    except Exception as err:  # recorded, the run goes on without this variant
        out["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        out["traceback"] = traceback.format_exc()[-3000:]
    return out


def fold_job(spec: dict) -> dict:
    """fold_onnx one unmerged file (all branches, or all but `keep`); verify a full fold against the base file."""
    out = {"variant": spec["variant"], "path": spec["path"]}
    try:
        lora_fx = import_lora_fx()
        from lora_fx.onnx.fold import fold_onnx
        t = time.perf_counter()
        report = fold_onnx(spec["source"], spec["path"], keep=spec.get("keep"))
        out["fold_s"] = time.perf_counter() - t
        out.update(folded=report.folded, rejected=report.rejected, kept=len(report.kept),
                   nodes_before=report.nodes_before, nodes=report.nodes_after)
        if spec.get("verify_against"):
            t = time.perf_counter()
            out["verify_identical"] = bool(lora_fx.verify_onnx(spec["verify_against"], spec["path"]).identical)
            out["verify_s"] = time.perf_counter() - t
        out["bytes"] = os.path.getsize(spec["path"])
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        out["traceback"] = traceback.format_exc()[-3000:]
    return out


def verify_job(spec: dict) -> dict:
    out = {"variant": spec["variant"]}
    try:
        lora_fx = import_lora_fx()
        out["verify_identical"] = bool(lora_fx.verify_onnx(spec["base"], spec["path"]).identical)
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
    return out


def run_jobs(fn, specs: list, jobs: int) -> list[dict]:
    if jobs <= 1 or len(specs) <= 1:
        return [fn(s) for s in specs]
    threads = max(1, (os.cpu_count() or 2) // min(jobs, len(specs)))
    for s in specs:
        (s[1] if isinstance(s, tuple) else s)["threads"] = threads
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(jobs, len(specs)), mp_context=ctx) as pool:
        return list(pool.map(fn, specs))


# ------------------------------------------------------------------------------------------------ variants
def group_variants(a, dtype: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(ONNX variants timed, the (target, rank) unmerged pairs) of one dtype."""
    ranks, targets = (a.ranks, a.targets) if dtype == "fp16" else (a.fp32_ranks, a.fp32_targets)
    pairs = [(t, r) for t in ("qv", "all") if t in targets for r in ranks]
    return ["base", "base_again", "merged", "onnx_folded"] + [f"unmerged_{t}_r{r}" for t, r in pairs], pairs


def prepare_files(a, workdir: pathlib.Path) -> dict:
    """Export every file of every (model, dtype) group in parallel, then the folds; returns the per-group records."""
    groups: dict[tuple[str, str], dict] = {}
    exports, folds = [], []
    for dtype in a.dtypes:  # dtype-major: with --budget-s, the fp16 results of both models come first
        for model in a.models:
            _, pairs = group_variants(a, dtype)
            ranks = sorted({r for _, r in pairs} | {a.merge_rank})
            prefix = workdir / f"{model}_{dtype}"
            files = {"base": f"{prefix}_base.onnx", "merged": f"{prefix}_merged.onnx",
                     "onnx_folded": f"{prefix}_onnx_folded.onnx"}
            for r in ranks:  # the all-linears export of each rank; qv files are derived from it
                files[f"unmerged_all_r{r}"] = f"{prefix}_unmerged_all_r{r}.onnx"
            for t, r in pairs:
                files[f"unmerged_{t}_r{r}"] = f"{prefix}_unmerged_{t}_r{r}.onnx"
            groups[(model, dtype)] = {"files": files, "records": {}}
            common = dict(model=model, dtype=dtype, tiny=a.tiny, merge_rank=a.merge_rank)
            exports.append(dict(common, variant="base", path=files["base"]))
            exports.append(dict(common, variant="merged", path=files["merged"]))
            for r in ranks:
                exports.append(dict(common, variant=f"unmerged_all_r{r}", path=files[f"unmerged_all_r{r}"]))
            folds.append(dict(variant="onnx_folded", group=(model, dtype), source=files[f"unmerged_all_r{a.merge_rank}"],
                              path=files["onnx_folded"], verify_against=files["base"]))
            for t, r in pairs:
                if t == "qv":
                    folds.append(dict(variant=f"unmerged_qv_r{r}", group=(model, dtype), path=files[f"unmerged_qv_r{r}"],
                                      source=files[f"unmerged_all_r{r}"], keep=QV[model]))
    log(f"exporting {len(exports)} ONNX files with {min(a.jobs, len(exports))} worker process(es)")
    t = time.perf_counter()
    by_spec = run_jobs(export_job, [dict(s) for s in exports], a.jobs)
    for spec, rec in zip(exports, by_spec):
        groups[(spec["model"], spec["dtype"])]["records"][spec["variant"]] = rec
        if "error" in rec:
            log(f"  export {spec['model']} {spec['dtype']} {spec['variant']} FAILED: {rec['error']}")
    export_wall = time.perf_counter() - t
    log(f"exports done in {export_wall:.1f}s; folding {len(folds)} files and verifying")
    t = time.perf_counter()
    second = [("fold", s) for s in folds] + [
        ("verify", dict(variant="merged", group=key, base=g["files"]["base"], path=g["files"]["merged"]))
        for key, g in groups.items()]
    results = run_jobs(_fold_or_verify, [(kind, {k: v for k, v in s.items() if k != "group"}) for kind, s in second],
                       a.jobs)
    for (kind, spec), rec in zip(second, results):
        records = groups[spec["group"]]["records"]
        if kind == "verify":
            records.setdefault("merged", {})["verify_identical"] = rec.get("verify_identical")
            if "error" in rec:
                records["merged"]["verify_error"] = rec["error"]
        else:
            records[spec["variant"]] = rec
        if "error" in rec:
            log(f"  {kind} {spec['variant']} of {spec['group']} FAILED: {rec['error']}")
    fold_wall = time.perf_counter() - t
    log(f"folds and verifies done in {fold_wall:.1f}s")
    return {"groups": groups, "export_wall_s": export_wall, "fold_wall_s": fold_wall}


def _fold_or_verify(item):
    kind, spec = item
    return fold_job(spec) if kind == "fold" else verify_job(spec)


# ------------------------------------------------------------------------------------------------ ONNX Runtime
def make_session(path: str, device: str, optimized: str | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = optimized
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(path, sess_options=so, providers=providers)
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"ONNX Runtime did not activate CUDA for {path}: providers {session.get_providers()}")
    return session


def count_ops(path: str) -> dict[str, int]:
    import onnx
    model = onnx.load(path, load_external_data=False)
    counts = collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                                 for n in model.graph.node)
    return dict(sorted(counts.items()))


def summarize(times: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times)
    q = lambda f: ms[min(len(ms) - 1, int(f * len(ms)))]  # noqa: E731
    return {"median_ms": statistics.median(ms), "p10_ms": q(0.1), "p90_ms": q(0.9), "n": len(ms),
            "runs_ms": [round(t * 1e3, 4) for t in times]}


def block_iters(a, seconds_per_run: float) -> int:
    """Timed runs per variant and round: --iters, fewer for slow runs (a block of about --block-s), at least 3."""
    return max(min(3, a.iters), min(a.iters, int(a.block_s / max(seconds_per_run, 1e-6))))


def alternate(variants: list[str], run_block, rounds: int) -> dict[str, list[float]]:
    """`rounds` rounds; each runs every variant's block once, in an order rotated by one per round."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    for k in range(rounds):
        order = variants[k % len(variants):] + variants[:k % len(variants)]
        for v in order:
            times[v] += run_block(v)
    return times


def ort_group(a, lora_fx, model: str, dtype: str, group: dict, workdir: pathlib.Path) -> dict:
    from lora_fx.onnx.runtime import time_session
    files, records = group["files"], group["records"]
    variants, _ = group_variants(a, dtype)
    usable = [v for v in variants if "error" not in records.get("base" if v == "base_again" else v, {"error": "missing"})]
    out: dict = {"sessions": {}, "ort_nodes": {}, "timings": {}, "checks": {}}
    sessions = {}
    for v in usable:
        path = files["base" if v == "base_again" else v]
        counted = ("base", "merged", f"unmerged_all_r{a.merge_rank}")
        optimized = str(workdir / f"opt_{model}_{dtype}_{v}.onnx") if v in counted else None
        t = time.perf_counter()
        try:
            sessions[v] = make_session(path, a.device, optimized)
        except Exception as err:
            out["sessions"][v] = {"error": f"{type(err).__name__}: {err}"[:500]}
            log(f"  session {v} FAILED: {err}")
            continue
        out["sessions"][v] = {"create_s": time.perf_counter() - t}
        if optimized:
            try:
                out["ort_nodes"][v] = count_ops(optimized)
            except Exception as err:
                out["ort_nodes"][v] = {"error": f"{type(err).__name__}: {err}"[:300]}
            finally:
                for p in workdir.glob(f"opt_{model}_{dtype}_{v}.onnx*"):
                    p.unlink()
    if sessions:
        out["provider"] = next(iter(sessions.values())).get_providers()[0]
        out["provider_options"] = {k: {kk: str(vv) for kk, vv in v.items()}
                                   for k, v in next(iter(sessions.values())).get_provider_options().items()}
    names = list(sessions)
    for batch, seq in a.shapes:
        ids = token_ids(model, a.tiny, batch, seq).numpy()
        feeds = {v: {sessions[v].get_inputs()[0].name: ids} for v in names}
        if (batch, seq) == min(a.shapes, key=lambda shape: shape[0] * shape[1]):  # small outputs (GPT-2 logits)
            out["checks"] = output_checks(sessions, feeds, a.merge_rank)
        one = {v: min(time_session(sessions[v], feeds[v], warmup=a.warmup, iters=2)) for v in names}
        iters = block_iters(a, max(one.values()))
        times = alternate(names, lambda v: time_session(sessions[v], feeds[v], warmup=1, iters=iters), a.rounds)
        out["timings"][f"{batch}x{seq}"] = {v: summarize(times[v]) for v in names}
        log(f"  ORT {model} {dtype} {batch}x{seq}: " + ", ".join(
            f"{v} {out['timings'][f'{batch}x{seq}'][v]['median_ms']:.2f}" for v in names) + " ms")
    del sessions
    gc.collect()
    return out


def output_checks(sessions: dict, feeds: dict, merge_rank: int) -> dict:
    """Max |difference| of the first output between pairs of variants (run once, on the smallest shape): merged vs
    ONNX-folded and vs unmerged (the same adapter: rounding only), base vs merged (the adapter's effect)."""
    outs = {}
    for v in ("base", "merged", "onnx_folded", f"unmerged_all_r{merge_rank}"):
        if v in sessions:
            outs[v] = sessions[v].run(None, feeds[v])[0].astype(np.float64)
    checks = {}
    pairs = [("merged", "onnx_folded"), ("merged", f"unmerged_all_r{merge_rank}"), ("base", "merged")]
    for x, y in pairs:
        if x in outs and y in outs:
            checks[f"max_abs({x}-{y})"] = float(np.max(np.abs(outs[x] - outs[y])))
    return checks


# ------------------------------------------------------------------------------------------------ PyTorch eager
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def eager_group(a, lora_fx, model_name: str, dtype: str) -> dict:
    device = a.device
    _, pairs = group_variants(a, dtype)
    t = time.perf_counter()
    model = build_model(model_name, a.tiny, dtype, device)
    example = token_ids(model_name, a.tiny, 2, 16).to(device)
    modules = {"base": model, "base_again": model}
    adapted_all = None
    for target, r in pairs:
        modules[f"unmerged_{target}_r{r}"] = adapt_variant(lora_fx, model, model_name, target, r, dtype, example)
        if (target, r) == ("all", a.merge_rank):
            adapted_all = modules[f"unmerged_{target}_r{r}"]
    if adapted_all is None:
        adapted_all = adapt_variant(lora_fx, model, model_name, "all", a.merge_rank, dtype, example)
    modules["merged"] = lora_fx.fold(adapted_all)
    # The traced base graph with the base weights: the fold of the same adapter with B = 0 (W + 0 = W exactly).
    # merged runs the same GraphModule code, so merged / base_traced isolates the fold from tracing's own effect
    # (base is the transformers module itself). Zeroing B afterwards does not change the unmerged module's speed.
    with torch.no_grad():
        for lora in adapted_all.lora_fx.values():
            lora.lora_B.zero_()
    modules["base_traced"] = lora_fx.fold(adapted_all)
    order = ["base", "base_again", "base_traced", "merged"] + [f"unmerged_{t}_r{r}" for t, r in pairs]
    out = {"prepare_s": time.perf_counter() - t, "timings": {}}
    for batch, seq in a.shapes:
        ids = token_ids(model_name, a.tiny, batch, seq).to(device)

        def block(v, iters):
            times = []
            with torch.no_grad():
                for _ in range(iters):
                    sync(device)
                    start = time.perf_counter()
                    modules[v](ids)
                    sync(device)
                    times.append(time.perf_counter() - start)
            return times

        one = {v: min(block(v, a.warmup + 1)[-2:] if a.warmup else block(v, 1)) for v in order}
        iters = block_iters(a, max(one.values()))
        times = alternate(order, lambda v: block(v, iters), a.rounds)
        out["timings"][f"{batch}x{seq}"] = {v: summarize(times[v]) for v in order}
        log(f"  eager {model_name} {dtype} {batch}x{seq}: " + ", ".join(
            f"{v} {out['timings'][f'{batch}x{seq}'][v]['median_ms']:.2f}" for v in order) + " ms")
    del modules, model, adapted_all
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ report
LABEL = {"base": "base", "base_again": "base again", "base_traced": "base traced", "merged": "merged",
         "onnx_folded": "ONNX-folded"}


def label(v: str) -> str:
    if v in LABEL:
        return LABEL[v]
    _, t, r = v.split("_")
    return f"unmerged {'q,v' if t == 'qv' else 'all'} {r}"


def timing_table(results: dict, key: str, title: str) -> list[str]:
    rows = []
    columns: list[str] = []
    for g in results["groups"]:
        for shape, per in g.get(key, {}).get("timings", {}).items():
            for v in per:
                if v not in columns:
                    columns.append(v)
    if not columns:
        return []
    lines = [f"### {title}: median ms per forward (ratio to base)", "",
             "| model | dtype | batch x seq | " + " | ".join(label(v) for v in columns) + " |",
             "|---|---|---|" + "---:|" * len(columns)]
    for g in results["groups"]:
        for shape, per in g.get(key, {}).get("timings", {}).items():
            base = per.get("base", {}).get("median_ms")
            cells = []
            for v in columns:
                if v not in per:
                    cells.append("-")
                    continue
                m = per[v]["median_ms"]
                cells.append(f"{m:.2f} ({m / base:.3f})" if base else f"{m:.2f}")
            rows.append(f"| {g['model']} | {g['dtype']} | {shape} | " + " | ".join(cells) + " |")
    return lines + rows + [""]


def nodes_table(results: dict) -> list[str]:
    k = results["meta"]["merge_rank"]
    unm = f"unmerged_all_r{k}"
    lines = ["### ONNX graphs: nodes in the file, and after ORT graph optimizations (ORT_ENABLE_ALL)", "",
             f"| model | dtype | file nodes base / merged / ONNX-folded / unmerged all r{k} | verify merged, ONNX-folded "
             f"| ORT nodes base / merged / unmerged all r{k} | same ORT op counts base, merged "
             f"| ORT ops unmerged all r{k} vs base |",
             "|---|---|---|---|---|---|---|"]
    for g in results["groups"]:
        rec = g["records"]
        nodes = " / ".join(str(rec.get(v, {}).get("nodes", "-")) for v in ("base", "merged", "onnx_folded", unm))
        ver = f"{rec.get('merged', {}).get('verify_identical')}, {rec.get('onnx_folded', {}).get('verify_identical')}"
        ort_nodes = g.get("ort", {}).get("ort_nodes", {})
        counts = {v: ort_nodes.get(v) if isinstance(ort_nodes.get(v), dict) and "error" not in ort_nodes.get(v) else None
                  for v in ("base", "merged", unm)}
        total = " / ".join(str(sum(c.values())) if c else "-" for c in counts.values())
        same = counts["base"] == counts["merged"] if counts["base"] and counts["merged"] else "-"
        diff = "-"
        if counts[unm] and counts["base"]:
            ops = sorted(set(counts["base"]) | set(counts[unm]))
            diff = ", ".join(f"{op} {counts['base'].get(op, 0)}->{counts[unm].get(op, 0)}"
                             for op in ops if counts["base"].get(op, 0) != counts[unm].get(op, 0)) or "none"
        lines.append(f"| {g['model']} | {g['dtype']} | {nodes} | {ver} | {total} | {same} | {diff} |")
    lines.append("")
    for g in results["groups"]:
        counts = g.get("ort", {}).get("ort_nodes", {}).get("base")
        if isinstance(counts, dict) and "error" not in counts:
            lines.append(f"- {g['model']} {g['dtype']} ORT ops of base: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return lines + [""]


def noise_lines(results: dict) -> list[str]:
    lines = ["### Noise and checks", ""]
    for g in results["groups"]:
        for key, what in (("ort", "ORT"), ("eager", "eager")):
            for shape, per in g.get(key, {}).get("timings", {}).items():
                if "base" in per and "base_again" in per:
                    b, b2 = per["base"]["median_ms"], per["base_again"]["median_ms"]
                    m = per.get("merged", {}).get("median_ms")
                    lines.append(f"- {g['model']} {g['dtype']} {shape} {what}: base again / base = {b2 / b:.3f}"
                                 + (f"; merged / base = {m / b:.3f}" if m else ""))
        checks = g.get("ort", {}).get("checks")
        if checks:
            lines.append(f"- {g['model']} {g['dtype']} outputs: " + ", ".join(f"{k} = {v:.3g}" for k, v in checks.items()))
    return lines + [""]


def markdown(results: dict) -> str:
    lines = [f"## ONNX latency: {results['meta']['device_name']} ({results['meta']['device']}), "
             f"onnxruntime {results['meta']['onnxruntime']}, torch {results['meta']['torch']}", ""]
    lines += timing_table(results, "ort", f"ONNX Runtime ({results['meta'].get('provider', '?')}, IO binding)")
    lines += timing_table(results, "eager", "PyTorch eager (torch.no_grad)")
    lines += nodes_table(results)
    lines += noise_lines(results)
    lines.append(f"Total run time: {results['meta'].get('total_s', 0):.0f} s "
                 f"(exports {results['meta'].get('export_wall_s', 0):.0f} s, folds {results['meta'].get('fold_wall_s', 0):.0f} s)")
    return "\n".join(lines)


def write_json(path, results) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    a = parse_args(argv)
    lora_fx = import_lora_fx()
    import onnxruntime as ort
    if a.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device (use --device cpu, or a CUDA build of torch)")
        if hasattr(ort, "preload_dlls"):
            with contextlib.redirect_stdout(io.StringIO()):
                ort.preload_dlls()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            sys.exit(f"--device cuda: onnxruntime {ort.__version__} has no CUDAExecutionProvider")
    import transformers
    workdir = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="onnx_latency_"))
    workdir.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": a.device,
        "device_name": torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "onnxruntime": ort.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "args": {k: v for k, v in vars(a).items()},
        "tf32_torch_matmul": torch.backends.cuda.matmul.allow_tf32, "merge_rank": a.merge_rank,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results = {"meta": meta, "groups": []}
    try:
        prepared = prepare_files(a, workdir)
        meta["export_wall_s"], meta["fold_wall_s"] = prepared["export_wall_s"], prepared["fold_wall_s"]
        for (model, dtype), group in prepared["groups"].items():
            entry = {"model": model, "dtype": dtype, "files": group["files"], "records": group["records"]}
            results["groups"].append(entry)
            if time.perf_counter() - T0 > a.budget_s:
                entry["ort"] = {"error": f"skipped: run time over --budget-s {a.budget_s:.0f}"}
                log(f"ONNX Runtime: {model} {dtype} SKIPPED (budget)")
                continue
            log(f"ONNX Runtime: {model} {dtype}")
            try:
                entry["ort"] = ort_group(a, lora_fx, model, dtype, group, workdir)
                meta["provider"] = entry["ort"].get("provider", meta.get("provider"))
            except Exception as err:
                entry["ort"] = {"error": f"{type(err).__name__}: {err}"[:500], "traceback": traceback.format_exc()[-3000:]}
                log(f"  ORT {model} {dtype} FAILED: {err}")
            write_json(a.out, results)
        if not a.no_eager:
            for entry in results["groups"]:
                if time.perf_counter() - T0 > a.budget_s:
                    entry["eager"] = {"error": f"skipped: run time over --budget-s {a.budget_s:.0f}"}
                    log(f"PyTorch eager: {entry['model']} {entry['dtype']} SKIPPED (budget)")
                    continue
                log(f"PyTorch eager: {entry['model']} {entry['dtype']}")
                try:
                    entry["eager"] = eager_group(a, lora_fx, entry["model"], entry["dtype"])
                except Exception as err:
                    entry["eager"] = {"error": f"{type(err).__name__}: {err}"[:500], "traceback": traceback.format_exc()[-3000:]}
                    log(f"  eager {entry['model']} {entry['dtype']} FAILED: {err}")
                write_json(a.out, results)
    finally:
        meta["total_s"] = time.perf_counter() - T0
        write_json(a.out, results)
        if not a.keep_files and not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(results))
    log(f"total run time {meta['total_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
