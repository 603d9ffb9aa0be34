#!/usr/bin/env python
"""LoRA training on a mixture-of-experts model, side by side in one process (issue 19): lora_fx vs HF PEFT's
target_parameters.

    python benchmarks/moe_train.py --out moe_h200.json           # the GPU run (see docs/benchmarks.md)
    python benchmarks/moe_train.py --tiny --out /tmp/moe.json    # CPU smoke test (seconds)

Model: transformers Qwen3MoeForCausalLM from a config with random weights, bf16, sdpa attention, use_cache=False,
experts_implementation="grouped_mm" (torch._grouped_mm on the GPU). Default: 24 layers, hidden 2048, 16 heads of 128
(4 kv heads), 64 experts of width 768 with 8 active per token, vocab 32000; the parameter count is computed and
written to the JSON ("parameters"). LoRA r=16, alpha=32, dropout 0 on q/k/v/o and on both expert weights
(gate_up_proj, down_proj: one A and one B per expert); the router is frozen. A and B are fp32.

Variants:
  lora_fx_eager, lora_fx_compile   lora_fx.adapt (torch.export front end, roles attn.* and moe.experts): grouped
                                   LoRA matmuls beside the base's grouped matmuls; eager / torch.compile
  peft_eager, peft_compile         PEFT get_peft_model(target_modules=q/k/v/o, target_parameters=the expert
                                   weights): a parametrization that builds W + B·A for every expert at every forward
Every forward runs under torch.autocast(bf16) (a no-op on CPU with --tiny, which runs fp32); loss = cross-entropy of
the logits on random labels; AdamW on the trainable parameters. Per variant: --warmup steps (the first includes
compilation: first_step_s), then --steps timed steps; tokens/s = batch*seq / median step time; peak memory =
torch.cuda.max_memory_allocated over the variant (weights, LoRA, optimizer state, activations). Ratios: lora_fx over
PEFT, eager and compiled (tokens/s: higher is better; memory: lower is better). Each variant runs in try/except (its
error is recorded) on a fresh model built with the same seed; the JSON is rewritten after every variant, and
--merge keeps the variants an earlier command wrote to the same --out (to split a run over several commands).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
VARIANTS = ("lora_fx_eager", "lora_fx_compile", "peft_eager", "peft_compile")


def model_config(tiny: bool, layers: int, experts: int, width: int, active: int):
    from transformers import Qwen3MoeConfig

    if tiny:
        return Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=128, use_cache=False)
    return Qwen3MoeConfig(vocab_size=32000, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=width,
                          num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                          num_experts=experts, num_experts_per_tok=active, max_position_embeddings=4096,
                          use_cache=False, tie_word_embeddings=False)


def build(config, device: str, dtype: torch.dtype):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the device: no fp32 copy of the weights on the way
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config._attn_implementation = "sdpa"
    model.set_experts_implementation("grouped_mm")
    return model.eval()  # dropout off in every variant (lora_fx's base runs as in eval mode anyway)


def adapt_variant(name: str, model, ids: torch.Tensor, r: int):
    """The trainable module of a variant and its trainable parameters."""
    if name.startswith("lora_fx"):
        import lora_fx

        rules = [lora_fx.Rule(role=["attn.q", "attn.k", "attn.v", "attn.out"], r=r, alpha=2 * r),
                 lora_fx.Rule(role="moe.experts", r=r, alpha=2 * r)]
        module = lora_fx.adapt(model, rules, example_inputs=(ids,), example_kwargs={"use_cache": False},
                               frontend="export")
        module.train()
        params = lora_fx.trainable_parameters(module)
    else:
        import peft

        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ATTENTION, target_parameters=EXPERTS)
        module = peft.get_peft_model(model, config)
        module.train()
        for p in module.parameters():  # PEFT keeps adapters in fp32 for a bf16 base; make sure, as lora_fx does
            if p.requires_grad:
                p.data = p.data.float()
        params = [p for p in module.parameters() if p.requires_grad]
    if name.endswith("compile"):
        module = torch.compile(module)
    return module, params


def run_variant(name: str, config, args, device: str, dtype: torch.dtype) -> dict:
    model = build(config, device, dtype)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    labels = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    module, params = adapt_variant(name, model, ids, args.r)
    adapt_s = time.perf_counter() - started
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            logits = module(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup:]
    median = statistics.median(timed)
    return {
        "tokens_per_s": args.batch * args.seq / median, "median_step_s": median, "mean_step_s": statistics.mean(timed),
        "first_step_s": times[0], "adapt_s": adapt_s, "loss": loss.item(),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "trainable_parameters": sum(p.numel() for p in params),
    }


def ratios(results: dict) -> dict:
    out = {}
    for mode in ("eager", "compile"):
        ours, theirs = results.get(f"lora_fx_{mode}", {}), results.get(f"peft_{mode}", {})
        if "tokens_per_s" in ours and "tokens_per_s" in theirs:
            out[f"{mode}_tokens_per_s"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            if ours.get("peak_memory_gib") and theirs.get("peak_memory_gib"):
                out[f"{mode}_peak_memory"] = ours["peak_memory_gib"] / theirs["peak_memory_gib"]
    best = [results[v]["tokens_per_s"] for v in results if "tokens_per_s" in results[v]]
    ours_best = max((results[v]["tokens_per_s"] for v in results if v.startswith("lora_fx")
                     and "tokens_per_s" in results[v]), default=None)
    peft_best = max((results[v]["tokens_per_s"] for v in results if v.startswith("peft")
                     and "tokens_per_s" in results[v]), default=None)
    if best and ours_best and peft_best:
        out["best_tokens_per_s"] = ours_best / peft_best
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, fp32 (smoke test)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--width", type=int, default=768, help="moe_intermediate_size")
    parser.add_argument("--active", type=int, default=8, help="experts per token")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--merge", action="store_true",
                        help="keep the results already in --out (variants run in separate commands, one report)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.warmup, args.steps, args.r = 2, 16, 1, 2, 4
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = model_config(args.tiny, args.layers, args.experts, args.width, args.active)
    import peft
    import transformers

    report = {"benchmark": "moe_train", "device": torch.cuda.get_device_name() if device == "cuda" else
              platform.processor() or "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "model": {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                        "experts": config.num_experts, "width": config.moe_intermediate_size,
                        "active": config.num_experts_per_tok, "dtype": str(dtype)},
              "results": {}}
    if args.merge and args.out.exists():
        report["results"] = json.loads(args.out.read_text()).get("results", {})
    with torch.device("meta"):
        from transformers import Qwen3MoeForCausalLM
        report["model"]["parameters"] = sum(p.numel() for p in Qwen3MoeForCausalLM(config).parameters())
    for name in [v for v in args.variants.split(",") if v]:
        started = time.perf_counter()
        try:
            report["results"][name] = run_variant(name, config, args, device, dtype)
            report["results"][name]["variant_s"] = time.perf_counter() - started
        except Exception as e:  # a variant that fails is recorded, the others still run
            report["results"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}",
                                       "traceback": traceback.format_exc()[-2000:]}
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        report["ratios"] = ratios(report["results"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(name, {k: v for k, v in report["results"][name].items() if k != "traceback"}, flush=True)
    print("ratios (lora_fx / PEFT):", report["ratios"], flush=True)
    return report


if __name__ == "__main__":
    main()
