#!/usr/bin/env python
"""LoRA training throughput under FSDP2 (torch.distributed.fsdp.fully_shard): tokens/s per GPU on N GPUs vs one.

    python benchmarks/train_fsdp2.py --gpus 1,2 --out results.json              # the GPU run (about 1.1B params)
    python benchmarks/train_fsdp2.py --tiny --gpus 1,2 --out /tmp/fsdp_tiny.json  # CPU smoke test for CI (gloo)

The model, data, LoRA setup, precision, timing and FLOP count are those of benchmarks/train_throughput.py (imported
from the same folder; every model/step option of that script is accepted: --batch, --seq, --steps, --warmup, --hidden,
--layers, --heads, --kv-heads, --intermediate, --vocab, --r, --alpha, --lr, --matmul-size, --copy-mib, --device).
Variants: lora_fx_eager, peft_eager, full_ft (and opt-in lora_fx_root, full_ft_fp32master): LoRA r=16 alpha=32 on q_proj,v_proj, base
bf16, A/B fp32, forward under torch.autocast(bf16), AdamW (fused on CUDA) built after sharding.

How: the launcher runs, for each N in --gpus, `python -m torch.distributed.run --standalone --nproc-per-node N
<this script> --worker ...`; rank 0 of each run writes a JSON, the launcher combines them into --out and prints a
table. A failing N is recorded (with its output tail); the others still run.
  N == 1: no FSDP at all: the plain single-GPU run is the baseline (--shard-single: FSDP2 on one process too).
  N >= 2: peft_eager and full_ft: the standard recipe, fully_shard on every decoder layer, then on the root.
          lora_fx_eager: the same recipe on lora_fx.split_layers(adapted), the layer view of the adapted graph:
          fully_shard on every layer part (which owns its layer's weights, the adapted model's own modules), then
          on the view. A torch.export graph itself reads every weight at the top and calls no layer module, so
          lora_fx_root (opt-in, the only way before split_layers) shards the adapted GraphModule at the root only:
          one FSDP unit, the whole base gathered on every GPU for the step.
Each rank trains on its own random data (per-rank batch = --batch); tokens/s per rank = batch*seq / median step.
Reported per (variant, N): tokens/s per GPU (mean and min over ranks), global tokens/s (sum), slowest rank's median
step, peak memory (max over ranks), MFU per GPU (each rank against its own measured bf16 matmul rate), and the
scaling efficiency = tokens/s per GPU at N / tokens/s at N=1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("train_throughput", os.path.join(HERE, "train_throughput.py"))
tt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tt)

VARIANTS = ("lora_fx_eager", "lora_fx_root", "peft_eager", "full_ft", "full_ft_fp32master")
DEFAULT_VARIANTS = "lora_fx_eager,peft_eager,full_ft"
SHARDING_NOTE = ("N>=2: peft_eager and full_ft: fully_shard per decoder layer, then the root. lora_fx_eager: the same "
                 "on lora_fx.split_layers(adapted) (a part per layer owns that layer's weights). lora_fx_root: "
                 "fully_shard on the adapted GraphModule root only (one FSDP unit: a torch.export graph reads its "
                 "weights at the top and calls no layer module). N=1: no FSDP.")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str], argparse.Namespace]:
    """This script's options, the model/step options forwarded to workers, and train_throughput's parsed args."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Model/step options: those of train_throughput.py (see the docstring).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2", help="comma list of process counts N (default %(default)s)")
    p.add_argument("--out", help="combined JSON (launcher) or this run's JSON (worker)")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU with gloo, few steps: a smoke test")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list from {VARIANTS} (default %(default)s)")
    p.add_argument("--targets", default="qv", help="LoRA targets, comma list of qv, all (default %(default)s)")
    p.add_argument("--run-timeout-s", type=float, default=1800.0, help="kill one N's run after this (default 1800)")
    p.add_argument("--pg-timeout-min", type=float, default=5.0, help="process-group timeout in minutes (default 5)")
    p.add_argument("--shard-single", action="store_true",
                   help="shard with FSDP2 at N=1 too (FSDP2's own cost on one GPU; checks the sharded path runs)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--world-label", type=int, default=None, help=argparse.SUPPRESS)
    a, rest = p.parse_known_args(argv)
    a.gpus = [int(n) for n in a.gpus.split(",") if n.strip()]
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if bad := [v for v in a.variants if v not in VARIANTS]:
        p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    if not a.gpus or min(a.gpus) < 1:
        p.error("--gpus needs positive process counts")
    m = tt.parse_args(rest + ["--targets", a.targets] + (["--tiny"] if a.tiny else []))  # validates the rest
    return a, rest, m


# ------------------------------------------------------------------------------------------------ worker
def build_variant(m, name: str, target: str | None, cfg, device, batches, shard: bool) -> dict:
    """The model of one variant on this rank, sharded with FSDP2 when `shard`, and the parameters to train."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    dtype = torch.float32 if name == "full_ft_fp32master" else torch.bfloat16
    model = tt.build_model(cfg, device, dtype)
    layers = model.model.layers
    adapted = None
    if name.startswith("lora_fx"):
        lora_fx = tt.import_lora_fx()
        rule = lora_fx.Rule(name="|".join(tt.TARGET_MODULES[target]), r=m.r, alpha=m.alpha)
        module = adapted = lora_fx.adapt(model, rules=[rule], example_inputs=(batches[0][0],))
        layers = []  # lora_fx_root: the graph never calls the layers, shard the root only (see the docstring)
        if name == "lora_fx_eager" and shard:
            module = lora_fx.split_layers(adapted)  # a part per layer, owning its weights
            layers = [part for parts in module.layer_modules.values() for part in parts]
    elif name == "peft_eager":
        from peft import LoraConfig, get_peft_model
        module = get_peft_model(model, LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=0.0, bias="none",
                                                  target_modules=list(tt.TARGET_MODULES[target])))
        layers = module.base_model.model.model.layers
    else:
        module = model
    _, n_train = tt.trainable_of(module)  # before sharding: global counts
    if shard:
        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
    all_params = list((adapted if adapted is not None else module).parameters())
    units = sum(isinstance(x, FSDPModule) for x in module.modules())
    # the optimizer (inside run_training) is built after fully_shard, which replaced the parameters
    params = list(lora_fx.lora_parameters(adapted)) if adapted is not None else tt.trainable_of(module)[0]
    if sum(p.numel() for p in params) != n_train:
        raise RuntimeError(f"{n_train} trainable parameters but {sum(p.numel() for p in params)} to optimize")
    return {"module": module, "params": params, "trainable": n_train,
            "sharded_params_fraction": sum(isinstance(p, DTensor) for p in all_params) / len(all_params),
            "fsdp_units": units,
            "param_dtypes": sorted({str(p.dtype) for p in all_params}),
            "trainable_dtypes": sorted({str(p.dtype) for p in params})}


def train_variant(m, name: str, built: dict, device, batches, pinfo, calib: dict) -> dict:
    """Warmup + timed steps (train_throughput.run_training builds the AdamW) and this rank's numbers."""
    n = built["trainable"]
    flops = tt.flops_per_step(m, pinfo, n, name.startswith("full_ft"))
    res = tt.run_training(m, "lora_fx_eager" if name == "lora_fx_root" else name, built["module"], built["params"],
                          device, batches, flops, n)
    res.update({k: built[k] for k in ("sharded_params_fraction", "fsdp_units", "param_dtypes", "trainable_dtypes")})
    if calib.get("matmul_tflops"):
        res["mfu"] = res["achieved_tflops"] / calib["matmul_tflops"]
    return res


def attempt(fn) -> tuple[object, dict | None]:
    """(fn(), None), or (None, the error record) if it raised."""
    try:
        return fn(), None
    except Exception as e:
        return None, {"status": "error", "error": f"{type(e).__name__}: {str(e)[:1500]}",
                      "traceback": traceback.format_exc()[-3000:]}


def aggregate(recs: list[dict], world: int) -> dict:
    """One row from every rank's record: per-GPU mean/min, global sum, slowest step, max peak, mean MFU."""
    out = {"world": world, "per_rank": recs}
    errors = [f"rank {i}: {r['error']}" for i, r in enumerate(recs) if r.get("status") != "ok"]
    if errors:
        st = "skipped" if all(r.get("status") == "skipped" for r in recs) else "error"
        return {**out, "status": st, "error": "; ".join(errors)[:4000]}
    tps = [r["tokens_per_s"] for r in recs]
    peaks = [r["peak_mem_gb"] for r in recs if r.get("peak_mem_gb") is not None]
    mfus = [r["mfu"] for r in recs if r.get("mfu") is not None]
    r0 = recs[0]
    return {**out, "status": "ok", "tokens_per_s_per_gpu": sum(tps) / world, "tokens_per_s_per_gpu_min": min(tps),
            "tokens_per_s_global": sum(tps), "step_s_median": max(r["step_s_median"] for r in recs),
            "peak_mem_gb": max(peaks) if peaks else None, "mfu": sum(mfus) / len(mfus) if mfus else None,
            "final_loss_finite": all(math.isfinite(r["final_loss"]) for r in recs),
            "trainable_params": r0["trainable_params"], "sharded_params_fraction": r0["sharded_params_fraction"],
            "fsdp_units": r0["fsdp_units"],
            "tokens_per_step_per_gpu": r0["tokens_per_step"], "param_dtypes": r0["param_dtypes"],
            "trainable_dtypes": r0["trainable_dtypes"]}


def worker(a: argparse.Namespace, m: argparse.Namespace) -> int:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = m.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=a.pg_timeout_min),
                            device_id=device if cuda else None)
    try:
        def gather(obj) -> list:
            objs = [None] * world
            dist.all_gather_object(objs, obj)
            return objs

        cfg, pinfo = tt.llama_config(m), tt.count_params(tt.llama_config(m))
        calib, err = attempt(lambda: tt.calibrate(device, m.matmul_size, m.copy_mib))
        calib = calib or err
        calibs = gather(calib)
        batches = tt.make_batches(m, device, seed=1 + 1000 * rank)  # each rank its own data (rank 0: tt's)
        data = {"world": world, "world_label": a.world_label, "backend": dist.get_backend(),
                "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                "calibration_per_rank": calibs, "results": []}
        have_peft = importlib.util.find_spec("peft") is not None
        for name in a.variants:
            for target in (None,) if name.startswith("full_ft") else m.targets:
                label = f"N={world} {name} [{tt.TARGET_LABEL.get(target, 'all params')}]"
                if rank == 0:
                    tt.log(f"{label} ...")
                if name == "peft_eager" and not have_peft:
                    rec = {"status": "skipped", "error": "peft not installed"}
                else:
                    built, rec = attempt(lambda: build_variant(m, name, target, cfg, device, batches,
                                                                     world > 1 or a.shard_single))
                    # lockstep: train only if every rank has its model (the training collectives need every rank)
                    if all(r is None for r in gather(rec)):
                        res, rec = attempt(lambda: train_variant(m, name, built, device, batches, pinfo, calib))
                        rec, res = rec or res, None
                    elif rec is None:
                        rec = {"status": "error", "error": "not trained: another rank failed to build its model"}
                    built = None
                if rec["status"] == "error":
                    tt.log(f"rank {rank}: {label} FAILED: {rec['error'][:300]}")
                tt.free_memory(device)
                row = {"variant": name, "target": target, "gpus": world, **aggregate(gather(rec), world)}
                data["results"].append(row)
                if rank == 0:
                    tt.write_json(a.out, data)  # after every variant: a run that dies later keeps these
                    if row["status"] == "ok":
                        tt.log(f"{label}: {row['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, step "
                               f"{row['step_s_median'] * 1e3:.1f} ms, peak {tt.fmt(row['peak_mem_gb'], '.2f')} GB")
        dist.barrier()
        return 0
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ launcher
def run_world(a: argparse.Namespace, rest: list[str], n: int, out: str) -> tuple[int, bool, str]:
    """One torch.distributed.run with N processes; streams its output; returns (exit code, timed out, output tail)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), __file__,
           "--worker", "--world-label", str(n), "--out", out, "--variants", ",".join(a.variants),
           "--targets", a.targets, "--pg-timeout-min", str(a.pg_timeout_min)] + (["--tiny"] if a.tiny else []) \
        + (["--shard-single"] if a.shard_single else []) + rest
    tt.log(f"N={n}: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timed_out: list[bool] = []

    def stop() -> None:  # torchrun starts each worker in its own session; on SIGTERM it stops them itself
        timed_out.append(True)
        tt.log(f"N={n}: still running after --run-timeout-s {a.run_timeout_s:.0f}: stopping it")
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
            return
        proc.kill()

    timer = threading.Timer(a.run_timeout_s, stop)
    timer.start()
    tail: collections.deque = collections.deque(maxlen=60)
    try:
        for line in proc.stdout:
            print(f"  [N={n}] {line}", end="", flush=True)
            tail.append(line)
        rc = proc.wait()
    finally:
        timer.cancel()
    return rc, bool(timed_out), "".join(tail)[-6000:]


def combine(results: list[dict], variants: list[str]) -> tuple[list[dict], list[dict]]:
    """Rows sorted by variant then N, with the scaling efficiency; the lora_fx / PEFT per-GPU ratio at each N."""
    def ok(v, t, n):
        return next((r for r in results if (r["variant"], r["target"], r["gpus"]) == (v, t, n)
                     and r["status"] == "ok"), None)

    results = sorted(results, key=lambda r: (variants.index(r["variant"]), r["target"] or "", r["gpus"]))
    for r in results:
        base = ok(r["variant"], r["target"], 1)
        r["scaling_efficiency"] = (r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
                                   if r["status"] == "ok" and base else None)
    ratios = []
    for t, n in sorted({(r["target"], r["gpus"]) for r in results if r["target"]}):
        fx, pe = ok("lora_fx_eager", t, n), ok("peft_eager", t, n)
        ratios.append({"target": t, "gpus": n, "lora_fx_vs_peft_tokens_per_gpu":
                       fx["tokens_per_s_per_gpu"] / pe["tokens_per_s_per_gpu"] if fx and pe else None})
    return results, ratios


def report(data: dict) -> str:
    m, fmt = data["args"], tt.fmt
    total = data["meta"]["params"]["total"]
    lines = [f"## FSDP2 training throughput: {data['meta'].get('device_name') or data['meta']['device']}, "
             f"{total:,} params ({total / 1e9:.2f}B), per-GPU batch {m['batch']} x seq {m['seq']}, "
             f"LoRA r={m['r']} alpha={m['alpha']:g}", "",
             "| variant | GPUs | tokens/s per GPU (mean / min) | global tokens/s | step ms | peak GB | MFU | "
             "scaling eff. | status |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in data["results"]:
        name = r["variant"] + (f" [{tt.TARGET_LABEL[r['target']]}]" if r["target"] else "")
        if r["status"] == "ok":
            lines.append(f"| {name} | {r['gpus']} | {r['tokens_per_s_per_gpu']:,.0f} / "
                         f"{r['tokens_per_s_per_gpu_min']:,.0f} | {r['tokens_per_s_global']:,.0f} | "
                         f"{r['step_s_median'] * 1e3:.1f} | "
                         f"{fmt(r['peak_mem_gb'], '.2f')} | {fmt(r['mfu'], '.1%')} | "
                         f"{fmt(r['scaling_efficiency'], '.2f')} | ok |")
        else:
            err = (r.get("error") or "").splitlines()[0][:90].replace("|", "/") if r.get("error") else ""
            lines.append(f"| {name} | {r['gpus']} | | | | | | | {r['status']}: {err} |")
    if data["ratios"]:
        lines += ["", "| lora_fx / PEFT tokens/s per GPU | LoRA on | GPUs | ratio |", "|---|---|---:|---:|"]
        lines += [f"| | {tt.TARGET_LABEL[x['target']]} | {x['gpus']} | "
                  f"{fmt(x['lora_fx_vs_peft_tokens_per_gpu'], '.2f')} |" for x in data["ratios"]]
    return "\n".join(lines + [""] + [f"- {n}" for n in data["notes"]])


def launcher(a: argparse.Namespace, rest: list[str], m: argparse.Namespace) -> int:
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "device": m.device, "device_name": None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "versions": tt.versions(), "params": tt.count_params(tt.llama_config(m)),
            "precision": "base bf16, LoRA A/B fp32, forward under torch.autocast(bf16), AdamW (fused on CUDA); "
                         "full_ft: bf16 params/grads/AdamW states"}
    data = {"meta": meta, "args": {**vars(m), **vars(a)}, "runs": [], "results": [], "ratios": [],
            "notes": [SHARDING_NOTE, "tokens/s per GPU = mean over ranks of batch*seq / median step; global = sum "
                      "over ranks; step ms = slowest rank's median; peak GB = max over ranks; MFU = mean over ranks "
                      "against each rank's measured bf16 matmul rate"]}
    if m.device == "cpu":
        data["notes"].append("CPU run (gloo): a smoke test; MFU and scaling efficiency mean nothing here")
    if a.shard_single:
        data["notes"].append("--shard-single: N=1 is sharded with FSDP2 as well (one process), not the plain run")
    for n in a.gpus:
        run = {"gpus": n, "status": "error"}
        if m.device == "cuda" and n > torch.cuda.device_count():
            run["error"] = f"{n} processes but {torch.cuda.device_count()} GPUs"
        else:
            with tempfile.TemporaryDirectory(prefix="train_fsdp2.") as d:
                tmp, t = os.path.join(d, "worker.json"), time.perf_counter()  # rank 0 writes it
                rc, timed_out, tail = run_world(a, rest, n, tmp)
                run.update(rc=rc, wall_s=time.perf_counter() - t)
                if os.path.exists(tmp):  # also when the run died part way: the variants it finished
                    with open(tmp) as f:
                        worker_data = json.load(f)
                    meta["device_name"] = meta["device_name"] or worker_data["device_name"]
                    data["results"] += worker_data.pop("results")
                    run.update(worker_data)
            run["status"] = "ok" if rc == 0 and "world" in run else "error"
            if run["status"] != "ok":
                run.update(error=f"exit code {rc}" + (", stopped after --run-timeout-s" if timed_out else "")
                           + ("" if "world" in run else ", no worker JSON"), output_tail=tail)
        data["runs"].append(run)
        if run["status"] != "ok":  # a row for every variant the failed run did not report
            seen = {(r["variant"], r["target"]) for r in data["results"] if r["gpus"] == n}
            data["results"] += [{"variant": v, "target": t, "gpus": n, "status": "error",
                                 "error": f"the N={n} run failed: {run['error']}"}
                                for v in a.variants for t in ((None,) if v.startswith("full_ft") else m.targets)
                                if (v, t) not in seen]
        data["results"], data["ratios"] = combine(data["results"], a.variants)
        tt.write_json(a.out, data)
    print("\n" + report(data))
    for run in data["runs"]:
        if run["status"] != "ok":
            print(f"\nN={run['gpus']} FAILED: {run['error']}\n{run.get('output_tail', '')[-2000:]}")
    print(f"\ntotal wall time {time.perf_counter() - tt.T0:.0f}s" + (f"; JSON: {a.out}" if a.out else ""))
    return 0 if any(r["status"] == "ok" for r in data["results"]) else 1


def main(argv=None) -> int:
    a, rest, m = parse_args(argv)
    return worker(a, m) if a.worker else launcher(a, rest, m)


if __name__ == "__main__":
    sys.exit(main())
