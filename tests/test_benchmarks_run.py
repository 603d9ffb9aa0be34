"""The benchmarks run end to end on CPU with --tiny: tests that they run and report sane numbers, not of speed."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"

pytest.importorskip("transformers")


def _load_script():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_default_model_is_about_1b_and_flops_follow_the_formula():
    tt = _load_script()
    a = tt.parse_args([])
    params = tt.count_params(tt.llama_config(a))
    assert 0.9e9 < params["total"] < 1.3e9
    assert params["matmul"] + params["embedding"] < params["total"] < params["matmul"] + params["embedding"] + 1e6
    T = a.batch * a.seq
    attn = 12 * a.layers * T * a.seq * a.hidden
    assert tt.flops_per_step(a, params, 0, True) == 6 * params["matmul"] * T + attn
    assert tt.flops_per_step(a, params, 1000, False) == 4 * params["matmul"] * T + 6 * 1000 * T + attn


@pytest.mark.slow  # about 30-60 s on a small CPU machine: two torch.export traces and two (aot_eager) compiles
def test_train_throughput_tiny_runs_end_to_end(tmp_path):
    have_peft = importlib.util.find_spec("peft") is not None
    variants = ["lora_fx_eager", "lora_fx_compile", "lora_fx_ckpt", "full_ft", "full_ft_fp32master"]
    if have_peft:
        variants += ["peft_eager", "peft_compile"]
    out = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--variants", ",".join(variants), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| variant | LoRA on | tokens/s |" in proc.stdout  # the markdown table is printed

    data = json.loads(out.read_text())
    assert {"meta", "args", "calibration", "results", "ops", "ratios", "checks", "notes"} <= set(data)
    assert data["meta"]["params"]["total"] > 0
    assert _positive(data["calibration"]["matmul_tflops"]) and _positive(data["calibration"]["copy_gbps"])
    assert data["calibration"]["matmul_rel_err_vs_fp32"] < 2e-2

    results = {(r["variant"], r["target"]): r for r in data["results"]}
    assert {v for v, _ in results} == set(variants)
    for (variant, target), r in results.items():
        assert r["status"] == "ok", (variant, target, r.get("error"), r.get("traceback"))
        for key in ("tokens_per_s", "step_s_median", "step_s_mean", "mfu", "flops_per_step", "trainable_params",
                    "first_step_s"):
            assert _positive(r[key]), (variant, key, r[key])
        assert math.isfinite(r["final_loss"])
        assert r["peak_mem_gb"] is None  # CPU: not measured
        assert (target is None) == variant.startswith("full_ft")
    assert results[("full_ft", None)]["trainable_params"] == data["meta"]["params"]["total"]
    lora = results[("lora_fx_eager", "qv")]
    assert 0 < lora["trainable_params"] < data["meta"]["params"]["total"] / 5
    assert lora["lora_dtype"] == ["torch.float32"]
    if have_peft:
        assert results[("peft_eager", "qv")]["trainable_params"] == lora["trainable_params"]

    ops = [o for o in data["ops"] if o["when"] == "lora_fx_eager"]
    assert len(ops) == 1
    for key in ("adapt_s", "fold_s_median", "fold_gbps", "fold_bytes", "fold_frac_of_copy_bw", "fold_weights_s",
                "fold_weights_gbps", "fold_weights_frac_of_copy_bw"):
        assert _positive(ops[0][key]), (key, ops[0][key])

    assert results[("lora_fx_ckpt", "qv")]["checkpointed_layers"] == data["meta"]["config"]["num_hidden_layers"]

    ratios = data["ratios"]["qv"]
    assert _positive(ratios["lora_vs_full_ft_tokens"]) and _positive(ratios["mfu_lora_fx_eager"])
    assert _positive(ratios["lora_ckpt_vs_full_ft_tokens"])
    if have_peft:
        assert _positive(ratios["lora_fx_vs_peft_eager_tokens"])
        assert _positive(ratios["lora_fx_vs_peft_compile_tokens"])
        assert ratios["trainable_params_equal"] is True
    assert {c["name"] for c in data["checks"]} >= {"lora_fx / PEFT tokens/s, eager", "MFU, best lora_fx variant"}


FSDP_SCRIPT = ROOT / "benchmarks" / "train_fsdp2.py"


@pytest.mark.slow  # about 40 s on 2 CPU cores: two torchrun launches (1 and 2 processes), a torch.export trace each
def test_train_fsdp2_tiny_runs_on_one_and_two_processes(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    have_peft = importlib.util.find_spec("peft") is not None
    variants = ["lora_fx_eager", "lora_fx_root", "full_ft"] + (["peft_eager"] if have_peft else [])
    out = tmp_path / "fsdp_tiny.json"
    proc = subprocess.run([sys.executable, str(FSDP_SCRIPT), "--tiny", "--gpus", "1,2", "--variants", ",".join(variants),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| variant | GPUs | tokens/s per GPU (mean / min) | global tokens/s |" in proc.stdout

    data = json.loads(out.read_text())
    assert {"meta", "args", "runs", "results", "ratios", "notes"} <= set(data)
    assert [(r["gpus"], r["status"], r["world"], r["backend"]) for r in data["runs"]] == [(1, "ok", 1, "gloo"),
                                                                                          (2, "ok", 2, "gloo")]
    assert any("split_layers" in n and "root only" in n for n in data["notes"])
    results = {(r["variant"], r["gpus"]): r for r in data["results"]}
    assert set(results) == {(v, n) for v in variants for n in (1, 2)}
    for (variant, n), r in results.items():
        tracebacks = [p.get("traceback") for p in r.get("per_rank", [])]
        assert r["status"] == "ok", (variant, n, r.get("error"), tracebacks)
        assert r["world"] == n and len(r["per_rank"]) == n
        per_rank = [p["tokens_per_s"] for p in r["per_rank"]]
        assert all(_positive(t) for t in per_rank), (variant, n, per_rank)
        for key in ("tokens_per_s_per_gpu", "tokens_per_s_global", "step_s_median", "mfu", "scaling_efficiency"):
            assert _positive(r[key]), (variant, n, key, r[key])
        assert r["tokens_per_s_global"] == pytest.approx(sum(per_rank), rel=1e-9)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(sum(per_rank) / n, rel=1e-9)
        assert r["tokens_per_s_per_gpu_min"] == pytest.approx(min(per_rank), rel=1e-9)
        assert r["final_loss_finite"] and all(math.isfinite(p["final_loss"]) for p in r["per_rank"])
        assert r["peak_mem_gb"] is None  # CPU: not measured
        # N=1: no FSDP at all; N=2: every parameter a DTensor on every rank
        assert [p["sharded_params_fraction"] for p in r["per_rank"]] == [1.0 if n == 2 else 0.0] * n, (variant, n)
        # a unit per decoder layer and the root; lora_fx_root: the root only
        layers = data["args"]["layers"]
        assert r["fsdp_units"] == (0 if n == 1 else 1 if variant == "lora_fx_root" else layers + 1), (variant, n)
        if n == 1:
            assert r["scaling_efficiency"] == 1.0
    lora = results[("lora_fx_eager", 2)]
    assert lora["trainable_dtypes"] == ["torch.float32"] and "torch.bfloat16" in lora["param_dtypes"]
    assert 0 < lora["trainable_params"] < data["meta"]["params"]["total"] / 5
    assert results[("full_ft", 2)]["trainable_params"] == data["meta"]["params"]["total"]
    losses = [p["final_loss"] for p in lora["per_rank"]]
    assert losses[0] != losses[1]  # each rank trained on its own data
    ratios = {x["gpus"]: x["lora_fx_vs_peft_tokens_per_gpu"] for x in data["ratios"] if x["target"] == "qv"}
    assert set(ratios) == {1, 2}
    if have_peft:
        for n in (1, 2):
            assert results[("peft_eager", n)]["trainable_params"] == results[("lora_fx_eager", n)]["trainable_params"]
            assert _positive(ratios[n])


def test_generate_latency_tiny_runs_end_to_end(tmp_path):
    """benchmarks/generate_latency.py --tiny on CPU: every variant exported and timed, merged verified identical."""
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate_latency.py"), "--tiny", "--out",
                           str(out), "--batches", "1", "--workdir", str(tmp_path / "files")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["verify_identical"] is True
    group = data["results"]["1"]
    assert set(group) == {"base", "base_again", "merged", "unmerged_qv", "unmerged_all"}
    assert all(_positive(r["prefill_ms"]) and _positive(r["decode_tokens_per_s"]) for r in group.values())
    assert data["ratios"]["1"]["base"] == {"prefill": 1.0, "decode": 1.0}
    assert _positive(data["torch_generate"]["1"]["decode_tokens_per_s"])
    assert "| batch | variant | prefill ms |" in proc.stdout


def test_moe_train_tiny_runs_end_to_end(tmp_path):
    """benchmarks/moe_train.py --tiny: lora_fx and PEFT target_parameters train the same LoRA (same count of
    trainable parameters, same loss at the first step within rounding) and report tokens/s and their ratio."""
    pytest.importorskip("peft")
    out = tmp_path / "moe_tiny.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_train.py"), "--tiny", "--variants",
                           "lora_fx_eager,peft_eager", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    results = data["results"]
    assert set(results) == {"lora_fx_eager", "peft_eager"}, results
    for name, r in results.items():
        assert "error" not in r, (name, r.get("error"))
        assert _positive(r["tokens_per_s"]) and _positive(r["median_step_s"]) and r["peak_memory_gib"] is None
    assert results["lora_fx_eager"]["trainable_parameters"] == results["peft_eager"]["trainable_parameters"]
    assert _positive(data["ratios"]["eager_tokens_per_s"])
    assert data["model"]["parameters"] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao (the quant extra) is not installed")
def test_qlora_and_fp8_benchmarks_tiny_run_end_to_end(tmp_path):
    """benchmarks/qlora_train.py (lora_fx's NF4 variant; the PEFT + bitsandbytes peer needs a GPU build) and the FP8
    variant of train_throughput.py, on CPU."""
    out = tmp_path / "qlora.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "qlora_train.py"), "--tiny", "--variants",
                           "lora_fx_nf4,lora_fx_nf4_loftq", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result, loftq = json.loads(out.read_text())["results"]
    for r in (result, loftq):
        assert r["status"] == "ok" and _positive(r["tokens_per_s"]) and math.isfinite(r["final_loss"])
        assert r["quantized_weights"] == 14  # 7 linears in each of the 2 layers
        assert r["quantized_mib_after"] < 0.3 * r["quantized_mib_before"]
    assert result["loftq_error_removed"] is None and 0 < loftq["loftq_error_removed"] < 1

    out = tmp_path / "fp8.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--variants", "lora_fx_fp8_eager", "--targets", "all",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["status"] == "ok" and result["quantized_weights"] == 15  # every linear, lm_head too
