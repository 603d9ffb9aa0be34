"""Coverage table: every zoo model x front end through lora_fx, end to end; writes docs/coverage.md.

    python benchmarks/coverage.py                           # CPU, fp32, every model, ONNX included
    python benchmarks/coverage.py --no-onnx -k llama        # only the FX half, models whose name has "llama"
    python benchmarks/coverage.py --device cuda --dtype bfloat16 --out docs/coverage.md --append
                                                            # the GPU run: bf16 base weights and autocast,
                                                            # LoRA in fp32; its table is added to the file

Runs the same steps as tests/test_models.py (tests/zoo/harness.py: Case): adapt -> 3 AdamW steps -> fold ->
export_onnx of the base and merged models -> verify_onnx -> check_parity (ONNX Runtime). For each case it records
the sites found, LoRA-adapted sites and LoRA modules, loss first/last, the fold error, verify's verdict, the ORT
error, and pass/fail with the failing step and the first line of its error. A failure never stops the run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import zoo as Z  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line}"[:240]


def run_one(entry: Z.Entry, frontend: str, *, onnx: bool, device: str, dtype: torch.dtype, workdir: pathlib.Path,
            verbose: bool, ort_device: str = "cpu") -> Z.CaseResult:
    case = Z.Case(entry, frontend, device=device, dtype=dtype, ort_device=ort_device)
    r = case.result
    t0 = time.perf_counter()
    try:
        with _quiet(verbose):
            case.fx_half()
            if onnx:
                why_not = Z.onnx_available()
                if why_not:
                    r.status, r.step, r.error = "pass", "", f"(ONNX not run: {why_not})"
                else:
                    case.onnx(workdir)
    except BaseException as e:  # noqa: BLE001 - record everything, pytest's Skipped included
        if isinstance(e, KeyboardInterrupt):
            raise
        skipped = type(e).__name__ == "Skipped" or (isinstance(e, ImportError) and r.step == "build")
        r.status = "skip" if skipped else "fail"
        r.error = first_line(e)
    r.seconds["total"] = round(time.perf_counter() - t0, 2)
    return r


@contextlib.contextmanager
def _quiet(verbose: bool):
    if verbose:
        yield
        return
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


# ------------------------------------------------------------------------------------------------ the report
def _fmt(x, spec=".1e") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    return format(x, spec)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(results: list[Z.CaseResult]) -> str:
    head = ("| model | front end | sites | adapted / LoRAs | loss first → last | fold err | dyn fold err | "
            "ONNX identical | ORT max err | result | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if r.status == "pass":
            result = "pass" + (f" {_cell(r.error)}" if r.error else "")
        elif r.status == "skip":
            result = f"skip: {_cell(r.error)}"
        else:
            bug = Z.KNOWN_BUGS.get(f"{'onnx' if r.step in ('onnx', 'verify', 'ort') else 'fx'}:{r.model}-{r.frontend}")
            result = f"**FAIL** at {r.step}" + (f" (known bug `{bug}`)" if bug else "") + f": {_cell(r.error)}"
        loss = f"{r.loss_first:.3f} → {r.loss_last:.3f}" if r.losses else "-"
        lines.append(
            f"| {r.model} | {r.frontend} | {_fmt(r.sites, 'd')} | "
            f"{_fmt(r.adapted_sites, 'd')} / {_fmt(r.loras, 'd')} | {loss} | {_fmt(r.fold_err)} | "
            f"{_fmt(r.fold_dyn_err)} | {_fmt(r.verify_identical)} | {_fmt(r.ort_err)} | {result} | "
            f"{r.seconds.get('total', 0):.0f} |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "timm", "onnx", "onnxscript", "onnxruntime"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
            if os.environ.get("PYTHONPATH") and any(module.__file__.startswith(p) for p in
                                                   os.environ["PYTHONPATH"].split(os.pathsep) if p):
                out[name] += f" (from PYTHONPATH: {pathlib.Path(module.__file__).parent.parent})"
        except ImportError:
            out[name] = "not installed"
    with contextlib.suppress(ImportError):
        import torchvision
        out["torchvision"] = torchvision.__version__
    return out


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPU cores visible"
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return text


def git_commit() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    return "?"


def section(results, args, elapsed: float) -> str:
    v = versions()
    passed = sum(r.status == "pass" for r in results)
    failed = [r for r in results if r.status == "fail"]
    skipped = sum(r.status == "skip" for r in results)
    title = f"## {args.device} {args.dtype}" + (" (FX half only)" if args.no_onnx else "")
    notes = [
        title, "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; lora_fx commit {git_commit()}",
        "- command: `" + " ".join(([f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else [])
                                  + ["python", "benchmarks/coverage.py", *map(shlex.quote, sys.argv[1:])]) + "`",
        f"- machine: {machine(args.device)}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- result: {passed} pass, {len(failed)} fail, {skipped} skip, of {len(results)} cases; {elapsed:.0f} s in all",
        "",
        table(results), "",
    ]
    details = [r for r in results if r.status != "pass" and r.error]
    if details:
        notes += ["Failures and skips, first line of each:", ""]
        notes += [f"- {r.model} / {r.frontend} ({r.status} at {r.step or '-'}): {_cell(r.error)}" for r in details]
        notes.append("")
    bugs = sorted({b for r in failed for k, b in Z.KNOWN_BUGS.items() if k.endswith(f":{r.model}-{r.frontend}")})
    if bugs:
        notes += ["Known bugs behind the failures (each reported with a repro and a proposed fix):", ""]
        notes += [f"- `{b}`: {Z.BUGS[b]}" for b in bugs] + [""]
    entry_notes = [(e.name, e.notes) for e in Z.ZOO if e.notes and any(r.model == e.name for r in results)]
    if entry_notes:
        notes += ["Notes on models:", ""] + [f"- {n}: {t}" for n, t in entry_notes] + [""]
    return "\n".join(notes)


HEADER = """# Coverage: models x front ends through lora_fx

Produced by `benchmarks/coverage.py` (do not edit by hand; re-run it). Each row is one tiny model (2 layers,
hidden 32-64, random weights, built offline from a config; tests/zoo/) through one front end:
adapt every linear-like site (r=8, alpha=16) -> 3 AdamW steps (lr 1e-2) on a fixed batch -> fold -> ONNX export of
the original model and of the merged one -> verify_onnx -> ONNX Runtime parity.

Columns: **sites** = linear-like call sites the match pass found; **adapted / LoRAs** = sites given a LoRA branch /
LoRA modules (one per weight: fewer LoRAs than sites means a weight used at several sites); **loss** = eval loss on
the training batch before the first and after the last step (cross-entropy to fixed random labels for LMs, MSE to a
fixed random target otherwise); **fold err** = max |folded - adapted| / max(1, max |adapted|) at the example shapes
(fp32 limit 1e-5: folding only reorders floating-point sums); **dyn fold err** = the same at batch 3 / sequence 5
(the model was traced at batch 2 / sequence 8); **ONNX identical** = verify_onnx(base, merged).identical;
**ORT max err** = max |ONNX Runtime - merged module| (absolute, all outputs); **s** = seconds for the row.
The front end `fx` is torch.fx symbolic tracing, `export` is torch.export (non-strict); transformers models
only have `export` (symbolic tracing fails on every transformers-5 model, with a hint to use export).
"""


def write(path: pathlib.Path, body: str, append: bool) -> None:
    if append and path.exists():
        text = path.read_text().rstrip() + "\n\n" + body
    else:
        text = HEADER + "\n" + body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="base weights' dtype; bfloat16/float16 train under autocast with fp32 LoRA")
    p.add_argument("-k", dest="only", action="append", default=[],
                   help="only models whose name contains this (repeatable)")
    p.add_argument("--frontend", choices=["fx", "export"], help="only this front end")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX half (export, verify, ORT)")
    p.add_argument("--ort-device", choices=["cpu", "cuda", "auto"],
                   help="where ONNX Runtime runs the parity check (default: cpu, or auto with --device cuda)")
    p.add_argument("--fast", action="store_true", help="leave out the models marked slow")
    p.add_argument("--extras", action="store_true", help="also run the special cases (tied weights)")
    p.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"), help="markdown file to write")
    p.add_argument("--append", action="store_true", help="add this run's section to --out instead of replacing it")
    p.add_argument("--json", help="also write the raw results as JSON here")
    p.add_argument("--workdir", help="keep the ONNX files here (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("-v", "--verbose", action="store_true", help="show warnings and the exporters' output")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    ort_device = args.ort_device or ("auto" if torch.device(args.device).type == "cuda" else "cpu")
    entries = list(Z.ZOO) + (list(Z.EXTRAS.values()) if args.extras else [])
    entries = [e for e in entries if (not args.only or any(k in e.name for k in args.only))
               and not (args.fast and e.slow)]
    cases = [(e, fe) for e in entries for fe in e.frontends if args.frontend in (None, fe)]
    if not cases:
        p.error("no case selected")

    tmp = None
    if args.workdir:
        workdir = pathlib.Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="lora_fx_coverage.")
        workdir = pathlib.Path(tmp.name)
    results = []
    t0 = time.perf_counter()
    try:
        for i, (entry, frontend) in enumerate(cases, 1):
            r = run_one(entry, frontend, onnx=not args.no_onnx, device=args.device, dtype=DTYPES[args.dtype],
                        workdir=workdir, verbose=args.verbose, ort_device=ort_device)
            results.append(r)
            loss = f"{r.loss_first:.3f}->{r.loss_last:.3f}" if r.losses else "-"
            print(f"[{i}/{len(cases)}] {entry.name:28s} {frontend:6s} {r.status:4s} sites={r.sites} loras={r.loras} "
                  f"loss={loss} fold={_fmt(r.fold_err)} identical={r.verify_identical} ort={_fmt(r.ort_err)} "
                  f"{r.seconds.get('total', 0):.1f}s {r.step} {r.error}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    elapsed = time.perf_counter() - t0
    out = pathlib.Path(args.out)
    write(out, section(results, args, elapsed), args.append)
    print(f"wrote {out} ({elapsed:.0f} s)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1, default=str))
    return 0 if not any(r.status == "fail" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
