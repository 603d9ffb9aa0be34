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
    variants = ["lora_fx_eager", "lora_fx_compile", "full_ft", "full_ft_fp32master"]
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
    for key in ("adapt_s", "fold_s_median", "fold_gbps", "fold_bytes", "fold_frac_of_copy_bw"):
        assert _positive(ops[0][key]), (key, ops[0][key])

    ratios = data["ratios"]["qv"]
    assert _positive(ratios["lora_vs_full_ft_tokens"]) and _positive(ratios["mfu_lora_fx_eager"])
    if have_peft:
        assert _positive(ratios["lora_fx_vs_peft_eager_tokens"])
        assert _positive(ratios["lora_fx_vs_peft_compile_tokens"])
        assert ratios["trainable_params_equal"] is True
    assert {c["name"] for c in data["checks"]} >= {"lora_fx / PEFT tokens/s, eager", "MFU, best lora_fx variant"}
