"""Generation latency of KV-cache decoder files on ONNX Runtime: does a merged LoRA cost nothing when serving?

A ~1B Llama-shaped decoder from config (random weights, fp16), exported with ``export_onnx(kv_cache=True)``:

  base          the model's export
  base_again    a second session of the same file: the noise between two sessions
  merged        adapt (all linears, r=8) -> random B -> lora_fx.fold -> export   (verify_onnx against base)
  unmerged_qv   the adapted model (q_proj, v_proj, r=8) exported unfolded
  unmerged_all  the adapted model (all linears, r=8) exported unfolded

For each batch size (default 1 and 16): prefill latency (a --prompt token prompt, empty cache) and decode speed
(--new one-token steps after it, greedy, the cache kept on the device: lora_fx.onnx.generate.DecodeStep, IO
binding), medians over --rounds rounds that rotate the variants' order; ratios to base. PyTorch ``generate`` on the
same (base) model gives the scale. JSON to --out, rewritten after every variant; a markdown table on stdout.

    python benchmarks/generate_latency.py --out generate_latency.json           # GPU: ORT CUDA, fp16
    python benchmarks/generate_latency.py --tiny --out /tmp/tiny.json           # CPU smoke test, fp32, seconds

Exports run once per --workdir; ``--reuse`` keeps files already there (so a long run can be split in two).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("base", "base_again", "merged", "unmerged_qv", "unmerged_all")
ALL_LINEAR = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, fp32, short prompt")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16; tiny 1,2)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; tiny 16)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 128; tiny 8)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default fp16; tiny fp32")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None, help="default cuda; tiny cpu")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=None, help="default 3; tiny 1")
    p.add_argument("--prefill-iters", type=int, default=None, help="timed prefills per round (default 5; tiny 2)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch generate")
    p.add_argument("--workdir", default=None, help="where the ONNX files go (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="keep ONNX files already in --workdir")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    a = p.parse_args(argv)
    tiny = a.tiny
    a.batches = [int(b) for b in (a.batches or ("1,2" if tiny else "1,16")).split(",")]
    a.prompt = a.prompt or (16 if tiny else 512)
    a.new = a.new or (8 if tiny else 128)
    a.dtype = a.dtype or ("fp32" if tiny else "fp16")
    a.device = a.device or ("cpu" if tiny else "cuda")
    a.rounds = a.rounds or (1 if tiny else 3)
    a.prefill_iters = a.prefill_iters or (2 if tiny else 5)
    a.variants = [v for v in a.variants.split(",") if v]
    if tiny:
        a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab = 2, 64, 128, 4, 2, 128
    return a


def llama(a: argparse.Namespace):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                      num_key_value_heads=a.kv_heads, max_position_embeddings=4096,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def adapted(model, pattern: str, rank: int):
    import torch

    import lora_fx

    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    out = lora_fx.adapt(copy.deepcopy(model), [lora_fx.Rule(name=pattern, r=rank, alpha=2 * rank)],
                        example_inputs=(ids,), example_kwargs={"use_cache": False})
    torch.manual_seed(1)
    with torch.no_grad():
        for lora in out.lora_fx.values():
            lora.lora_B.normal_(0, 0.02)
    return out


def export_all(a: argparse.Namespace, workdir: pathlib.Path, dtype, record: dict) -> dict[str, pathlib.Path]:
    import lora_fx

    files = {"base": workdir / "base.onnx", "merged": workdir / "merged.onnx",
             "unmerged_qv": workdir / "unmerged_qv.onnx", "unmerged_all": workdir / "unmerged_all.onnx"}
    wanted = {v if v != "base_again" else "base" for v in a.variants} | {"base"}
    model = llama(a)
    record["meta"]["params"] = sum(p.numel() for p in model.parameters())
    makers = {"base": lambda: model,
              "merged": lambda: lora_fx.fold(adapted(model, ALL_LINEAR, a.rank)),
              "unmerged_qv": lambda: adapted(model, "q_proj|v_proj", a.rank),
              "unmerged_all": lambda: adapted(model, ALL_LINEAR, a.rank)}
    for name in ("base", "merged", "unmerged_qv", "unmerged_all"):
        if name not in wanted or (a.reuse and files[name].is_file()):
            continue
        start = time.perf_counter()
        try:
            lora_fx.export_onnx(makers[name](), files[name], kv_cache=True, dtype=dtype)
            record["exports"][name] = {"seconds": time.perf_counter() - start}
        except Exception as err:  # recorded; the run goes on with the other variants
            record["exports"][name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        write(a.out, record)
    if "merged" in wanted and files["merged"].is_file():
        report = lora_fx.verify_onnx(files["base"], files["merged"])
        record["verify_identical"] = report.identical
        if not report.identical:
            record["verify_report"] = str(report)[:4000]
    return files


def measure(session, a: argparse.Namespace, batch: int, device: str) -> dict[str, Any]:
    """Prefill ms (median of --prefill-iters) and decode tokens/s over --new greedy steps, one round."""
    import torch

    from lora_fx.onnx.generate import DecodeStep, decoder_io

    io = decoder_io(session)
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    step = DecodeStep(session, io, dev)
    ids = torch.randint(3, io.vocab, (batch, a.prompt), generator=torch.Generator().manual_seed(batch)).to(dev)
    mask = torch.ones(batch, a.prompt, dtype=io.mask_dtype, device=dev)
    empty = [torch.empty(batch, io.kv_heads, 0, io.head_dim, dtype=io.cache_dtype, device=dev)
             for _ in range(2 * io.layers)]
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    step(ids, mask, empty)  # warm-up
    times = []
    for _ in range(a.prefill_iters):
        sync()
        start = time.perf_counter()
        last, past = step(ids, mask, empty)
        sync()
        times.append(time.perf_counter() - start)
    new = last.argmax(-1, keepdim=True)
    sync()
    start = time.perf_counter()
    for _ in range(a.new):
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=dev)], dim=1)
        last, past = step(new, mask, past)
        new = last.argmax(-1, keepdim=True)
    sync()
    decode = time.perf_counter() - start
    return {"prefill_ms": 1e3 * statistics.median(times), "prefill_ms_all": [1e3 * t for t in times],
            "decode_tokens_per_s": batch * a.new / decode, "decode_s": decode}


def torch_generate(a: argparse.Namespace, dtype, batch: int, device: str) -> dict[str, Any]:
    import torch

    model = llama(a).to(device=device, dtype=dtype)
    ids = torch.randint(3, a.vocab, (batch, a.prompt), generator=torch.Generator().manual_seed(batch)).to(device)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        sync()
        start = time.perf_counter()
        model(input_ids=ids)
        sync()
        prefill = time.perf_counter() - start
        options = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new,
                       min_new_tokens=a.new, do_sample=False, pad_token_id=0)
        model.generate(**{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        sync()
        start = time.perf_counter()
        model.generate(**options)
        sync()
        total = time.perf_counter() - start
    return {"prefill_ms": 1e3 * prefill, "generate_s": total,
            "decode_tokens_per_s": batch * a.new / max(total - prefill, 1e-9)}


def write(path: str, record: dict) -> None:
    target = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=".generate_latency.")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(tmp, target)


def table(record: dict) -> str:
    lines = ["| batch | variant | prefill ms | prefill / base | decode tokens/s | decode / base |",
             "|---:|---|---:|---:|---:|---:|"]
    for batch, group in record["results"].items():
        base = group.get("base", {})
        for variant, r in group.items():
            if "prefill_ms" not in r:
                lines.append(f"| {batch} | {variant} | error | | | |")
                continue
            ratio = lambda key: (f"{r[key] / base[key]:.3f}" if base.get(key) else "")  # noqa: E731
            lines.append(f"| {batch} | {variant} | {r['prefill_ms']:.2f} | {ratio('prefill_ms')} | "
                         f"{r['decode_tokens_per_s']:.1f} | {ratio('decode_tokens_per_s')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    import lora_fx
    from lora_fx.onnx.runtime import ort_session

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[a.dtype]
    started = time.perf_counter()
    record: dict[str, Any] = {"meta": {"torch": torch.__version__, "lora_fx": lora_fx.__version__},
                              "args": vars(a), "exports": {}, "results": {}, "torch_generate": {}}
    try:
        import onnxruntime as ort

        record["meta"]["onnxruntime"] = ort.__version__
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    except Exception as err:  # recorded: sessions below fail with their own error
        record["meta"]["preload_error"] = str(err)
    workdir = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="generate_latency_"))
    workdir.mkdir(parents=True, exist_ok=True)
    files = export_all(a, workdir, dtype, record)
    sessions = {}
    for variant in a.variants:
        path = files["base" if variant == "base_again" else variant]
        if path.is_file():
            sessions[variant] = ort_session(path, a.device)
            record["meta"]["provider"] = sessions[variant].get_providers()[0]
    device = "cuda" if record["meta"].get("provider") == "CUDAExecutionProvider" else "cpu"
    for batch in a.batches:
        group = record["results"].setdefault(str(batch), {v: {"rounds": []} for v in sessions})
        for round_ in range(a.rounds):
            order = list(sessions)[round_ % len(sessions):] + list(sessions)[:round_ % len(sessions)]
            for variant in order:
                try:
                    group[variant]["rounds"].append(measure(sessions[variant], a, batch, device))
                except Exception as err:
                    group[variant]["error"] = f"{type(err).__name__}: {err}"[:2000]
        for variant, r in group.items():
            if r["rounds"]:
                r["prefill_ms"] = statistics.median(x["prefill_ms"] for x in r["rounds"])
                r["decode_tokens_per_s"] = statistics.median(x["decode_tokens_per_s"] for x in r["rounds"])
        base = group.get("base", {})
        record.setdefault("ratios", {})[str(batch)] = {
            v: {"prefill": r["prefill_ms"] / base["prefill_ms"],
                "decode": r["decode_tokens_per_s"] / base["decode_tokens_per_s"]}
            for v, r in group.items() if "prefill_ms" in r and "prefill_ms" in base}
        write(a.out, record)
        if not a.no_torch:
            try:
                record["torch_generate"][str(batch)] = torch_generate(a, dtype or torch.float32, batch, device)
            except Exception as err:
                record["torch_generate"][str(batch)] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            write(a.out, record)
    record["seconds"] = time.perf_counter() - started
    write(a.out, record)
    print(table(record))
    for batch, r in record["torch_generate"].items():
        if "prefill_ms" in r:
            print(f"PyTorch generate, batch {batch}: prefill {r['prefill_ms']:.2f} ms, decode "
                  f"{r['decode_tokens_per_s']:.1f} tokens/s")
    print(f"verify merged vs base: {record.get('verify_identical')}; provider {record['meta'].get('provider')}; "
          f"{record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
