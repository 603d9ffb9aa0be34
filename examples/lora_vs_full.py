"""Does LoRA match full fine-tuning? The paper's central claim, at small scale, offline.

1. Pretrain a small GPT (examples/tiny_gpt.py) on CPython's help text (pydoc_data).
2. Adapt it to a data-to-text task in the style of E2E NLG ("name[Aromi], food[Chinese], ... => Aromi is a ..."),
   generated from templates, with held-out (name, food) combinations in the test set.
3. Compare on the held-out set: no adaptation, full fine-tuning, LoRA on q,v (r=4 and r=8), LoRA on all linears,
   and LoRA on all linears over a quantized frozen base (lora_fx.quantize_base: NF4 as in QLoRA, NF4 with the LoRA
   started at the quantization error (LoftQ), and FP8), where
   lora_fx.compare_folds also measures how far each merged model (the LoRA folded into the original or the
   dequantized weights) is from the quantized model that was trained; the merged model is what gets evaluated.
   On a GPU with peft and bitsandbytes installed, the peer runs too: PEFT's LoRA over bitsandbytes' NF4 layers
   (QLoRA as its authors ship it), so a gap to bf16 LoRA can be told apart from what NF4 itself costs.
   Metric: exact match (the greedy decode of the sentence equals the reference: every target character is the
   model's argmax given the reference prefix) and the held-out loss on the sentence.
Reports trainable parameters, adapter file size, training time and peak memory; writes a loss-curve PNG and a
Markdown table.

    python examples/lora_vs_full.py --out out/lora_vs_full            # GPU: a few minutes
    python examples/lora_vs_full.py --quick --out out/lora_vs_full    # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import lora_fx  # noqa: E402
from lora_fx import Rule  # noqa: E402
from tiny_gpt import STOI, TinyGPT, e2e_batch, e2e_split, encode, lm_loss, pydoc_corpus, random_windows  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    tqdm = None

VARIANTS = {  # name -> rules (None = full fine-tuning, "none" = no adaptation)
    "no adaptation": "none",
    "full fine-tuning": None,
    "LoRA q,v r=4": [Rule(name="q_proj|v_proj", r=4, alpha=8)],
    "LoRA q,v r=8": [Rule(name="q_proj|v_proj", r=8, alpha=16)],
    "LoRA all linears r=8": [Rule(name="head", exclude=True), Rule(op="linear_module", r=8, alpha=16)],
    "LoRA all linears r=8, NF4 base": [Rule(name="head", exclude=True), Rule(op="linear_module", r=8, alpha=16)],
    "LoRA all linears r=8, NF4 base, LoftQ": [Rule(name="head", exclude=True), Rule(op="linear_module", r=8, alpha=16)],
    "LoRA all linears r=8, FP8 base": [Rule(name="head", exclude=True), Rule(op="linear_module", r=8, alpha=16)],
    "PEFT + bitsandbytes QLoRA all linears r=8": "peft_bnb",
}
PEER = "PEFT + bitsandbytes QLoRA all linears r=8"
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up", "down"]  # every linear of TinyGPT but the head
QUANTIZED = {  # name -> (kind, lora_init) of lora_fx.quantize_base
    "LoRA all linears r=8, NF4 base": ("nf4", "keep"),
    "LoRA all linears r=8, NF4 base, LoftQ": ("nf4", "loftq"),
    "LoRA all linears r=8, FP8 base": ("fp8", "keep"),
}
BF16_LORA = "LoRA all linears r=8"  # what the quantized variants are measured against


def progress(iterable, desc):
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True) if tqdm else iterable


def train(model, params, batches, steps, lr, device, desc) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in progress(range(steps), desc):
        ids = batches().to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = lm_loss(model(ids), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def peer_available(device: str) -> str | None:
    """None when PEFT + bitsandbytes can run here, else why not (bitsandbytes' NF4 kernels need a GPU)."""
    if device != "cuda":
        return "bitsandbytes' NF4 needs a GPU"
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        return f"not installed ({e})"
    return None


def peft_bnb_qlora(model: torch.nn.Module, init: torch.nn.Module, tmp: pathlib.Path) -> torch.nn.Module:
    """The peer: TinyGPT's linears (not the head) as bitsandbytes Linear4bit (NF4, double quantization, bf16
    compute; what transformers' BitsAndBytesConfig(load_in_4bit=True) builds), then PEFT LoRA r=8 on them, started
    at the LoRA init of `init` (a lora_fx model adapted with the same seed, written by save_peft_adapter): the peer
    and the lora_fx variants share base, data order and init, so their difference is the NF4 implementation's."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in PEFT_TARGETS and isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(child.weight.device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, name, q)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PEFT_TARGETS))
    lora_fx.save_peft_adapter(init, tmp)
    result = set_peft_model_state_dict(peft_model, load_file(str(tmp / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise RuntimeError(f"the LoRA init did not load into PEFT: {result.unexpected_keys[:3]}")
    return peft_model


def peft_bnb_fold(peft_model: torch.nn.Module, base: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of `base` whose adapted weights are dequant(NF4) + (alpha/r)·B·A in fp32: the peer's trained
    model as the same kind of merged model the other variants are evaluated as."""
    import bitsandbytes.functional as bnbf

    merged = copy.deepcopy(base)
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            w = module.base_layer.weight
            dense = bnbf.dequantize_4bit(w.data, w.quant_state).float()
            delta = module.get_delta_weight("default").float()
            path = name.removeprefix("base_model.model.")
            merged.get_submodule(path).weight.data.copy_(dense + delta)
    return merged


def padded(examples: list[str], device: str) -> torch.Tensor:
    encoded = [encode(e) for e in examples]
    ids = torch.full((len(encoded), max(len(e) for e in encoded)), STOI["\n"], dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e)] = e
    return ids.to(device)


@torch.no_grad()
def evaluate(model, examples: list[str], device: str) -> tuple[float, float]:
    """(exact match, mean loss) over the sentence part of each example, teacher-forced and batched."""
    model.eval()
    encoded = [encode(e) for e in examples]
    starts = [e.index("=> ") + 3 for e in examples]
    ids = padded(examples, device)
    logits = model(ids).float()
    exact, losses = 0, []
    for i, (e, s) in enumerate(zip(encoded, starts)):
        target = ids[i, s:len(e)]
        pred = logits[i, s - 1:len(e) - 1]
        exact += int((pred.argmax(-1) == target).all())
        losses.append(F.cross_entropy(pred, target).item())
    return exact / len(examples), sum(losses) / len(losses)


def adapt_and_train(name, rules, base, train_set, test_batches, example, gen, args, device, out) -> dict:
    """One variant, one seed: adapt (or not), train, save the adapter, fold; the merged model and the numbers."""
    model = copy.deepcopy(base)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0, size_bytes, folds = time.perf_counter(), None, None
    batches = lambda: e2e_batch(train_set, 32, 128, gen)
    if rules == "none":
        trainable, losses = 0, []
    elif rules == "peft_bnb":  # the peer, trained like the LoRA variants, evaluated as its dequantized fold
        init = lora_fx.adapt(copy.deepcopy(base), VARIANTS[BF16_LORA], example_inputs=example)
        peft_model = peft_bnb_qlora(model, init, out / "peft_init")
        params = [p for p in peft_model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        losses = train(peft_model, params, batches, args.steps, 2e-3, device, name)
        model = peft_bnb_fold(peft_model, base)
    elif rules is None:  # full fine-tuning
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
        trainable = sum(p.numel() for p in params)
        losses = train(model, params, batches, args.steps, 3e-4, device, name)
        size_bytes = trainable * 4
    else:
        model = lora_fx.adapt(model, rules, example_inputs=example)
        if name in QUANTIZED:
            kind, lora_init = QUANTIZED[name]
            print(lora_fx.quantize_base(model, kind, lora_init=lora_init))
        params = list(lora_fx.lora_parameters(model))
        trainable = sum(p.numel() for p in params)
        losses = train(model, params, batches, args.steps, 2e-3, device, name)
        from safetensors.torch import save_file
        path = out / "adapter.safetensors"
        save_file({k: v.contiguous() for k, v in lora_fx.lora_state_dict(model).items()}, str(path))
        size_bytes = path.stat().st_size
        if name in QUANTIZED:  # which fold is closer to the quantized model that was trained (fold takes it)
            folds = lora_fx.compare_folds(model, test_batches)
            print(folds)
        model = lora_fx.fold(model)
    return {"variant": name, "model": model, "losses": losses, "trainable": trainable, "file_bytes": size_bytes,
            "train_s": time.perf_counter() - t0,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
            "merged_vs_quantized_rel_l2": folds and folds.rel_l2, "fold": folds and folds.closer}


def summary(name: str, runs: list[dict]) -> dict:
    """A variant over its seeds: the mean of each number, and the held-out loss's range."""
    mean = lambda key: sum(r[key] for r in runs) / len(runs)
    gaps = [r["merged_vs_quantized_rel_l2"] for r in runs if r["merged_vs_quantized_rel_l2"]]
    return {"variant": name, "seeds": len(runs), "exact_match": mean("exact_match"), "test_loss": mean("test_loss"),
            "test_loss_min": min(r["test_loss"] for r in runs), "test_loss_max": max(r["test_loss"] for r in runs),
            "trainable": runs[0]["trainable"], "file_bytes": runs[0]["file_bytes"], "train_s": mean("train_s"),
            "peak_mib": runs[0]["peak_mib"],
            "merged_vs_quantized_rel_l2": {k: max(g[k] for g in gaps) for k in gaps[0]} if gaps else None,
            "fold": runs[0]["fold"]}


def quantized_vs_bf16(runs: list[dict]) -> dict[str, list[float]]:
    """Per quantized variant (the peer's too), its held-out loss relative to bf16 LoRA's in the same seed (paired: same data order
    and LoRA init, so the seed's luck cancels): (loss - bf16 loss) / bf16 loss, one number per seed."""
    reference = {r["seed"]: r["test_loss"] for r in runs if r["variant"] == BF16_LORA}
    return {name: [(r["test_loss"] - reference[r["seed"]]) / reference[r["seed"]]
                   for r in runs if r["variant"] == name and r["seed"] in reference] for name in (*QUANTIZED, PEER)
            if any(r["variant"] == name and r["seed"] in reference for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/lora_vs_full")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--only", default="", help="run only the variants whose name matches this regular "
                        "expression (e.g. 'all linears' for LoRA on all linears with and without a quantized base)")
    parser.add_argument("--seeds", type=int, default=1, help="runs of each variant, with another data order and "
                        "LoRA init each (every variant of a run gets the same); the table shows the mean and the "
                        "held-out loss's range")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed's number (runs in parallel processes "
                        "take different seeds; each pretrains its own base)")
    parser.add_argument("--width", type=int, default=384, help="the model's hidden size (6 heads of width/6)")
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.steps = 60, 40
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = dict(d=64, layers=2, heads=4, ctx=192) if args.quick else dict(d=args.width, layers=args.layers,
                                                                             heads=6, ctx=192)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    base = TinyGPT(**size).to(device)
    corpus = encode(pydoc_corpus())
    t0 = time.perf_counter()
    pre = train(base, list(base.parameters()), lambda: random_windows(corpus, 32, 128, gen), args.pretrain_steps,
                1e-3, device, "pretrain")
    print(f"pretrained {sum(p.numel() for p in base.parameters()):,} parameters on pydoc text "
          f"({args.pretrain_steps} steps, {time.perf_counter() - t0:.0f} s): loss {pre[0]:.2f} -> {pre[-1]:.2f}")
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    train_set, test_set = e2e_split()
    example = (e2e_batch(train_set, 2, 128, gen).to(device),)

    test_batches = [padded(test_set[i:i + 64], device) for i in range(0, len(test_set), 64)]
    variants = {name: rules for name, rules in VARIANTS.items() if re.search(args.only, name)}
    if "peft_bnb" in variants.values() and (why := peer_available(device)):
        print(f"skipping the PEFT + bitsandbytes variant: {why}")
        variants = {name: rules for name, rules in variants.items() if rules != "peft_bnb"}
    runs, curves = [], {}
    # every variant of a seed sees the same data order and the same LoRA init
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name, rules in variants.items():
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(1000 + seed)
            run = adapt_and_train(name, rules, base, train_set, test_batches, example, gen, args, device, out)
            run["exact_match"], run["test_loss"] = evaluate(run.pop("model"), test_set, device)
            curves.setdefault(name, run.pop("losses"))
            runs.append({"seed": seed, **run})
            print(f"seed {seed} {name:30s} exact match {run['exact_match']:6.1%}  test loss {run['test_loss']:.3f}  "
                  f"trainable {run['trainable']:>10,}  {run['train_s']:6.1f} s")
    results = [summary(name, [r for r in runs if r["variant"] == name]) for name in variants]
    paired = quantized_vs_bf16(runs)

    lines = [f"| variant | held-out exact match | held-out loss (mean, range over {args.seeds} seeds) | trainable "
             "params | file size | train time | peak GPU memory | merged vs quantized model (rel. L2: dequantized / "
             "original fold) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        size_txt = f"{r['file_bytes'] / 2**10:,.0f} KiB" if r["file_bytes"] else "-"
        peak = f"{r['peak_mib']:,.0f} MiB" if r["peak_mib"] else "-"
        gap = r["merged_vs_quantized_rel_l2"]
        original = f"{gap['original']:.1e}" if gap and "original" in gap else "- (LoftQ: refused)"
        gap_txt = f"{gap['dequantized']:.1e} / {original} (folded: {r['fold']})" if gap else "-"
        loss = f"{r['test_loss']:.3f}" + (f" ({r['test_loss_min']:.3f}-{r['test_loss_max']:.3f})"
                                          if r["seeds"] > 1 else "")
        lines.append(f"| {r['variant']} | {r['exact_match']:.1%} | {loss} | {r['trainable']:,} | "
                     f"{size_txt} | {r['train_s']:.1f} s | {peak} | {gap_txt} |")
    for name, diffs in paired.items():
        # the standard error says how far the mean can be trusted: on this task one seed's loss moves a lot
        spread = f" (standard error {statistics.stdev(diffs) / len(diffs) ** 0.5:.1%})" if len(diffs) > 1 else ""
        lines.append(f"\n{name}: held-out loss vs bf16 LoRA (same seed, data order and init): mean "
                     f"{sum(diffs) / len(diffs):+.1%}{spread}, per seed {', '.join(f'{d:+.1%}' for d in diffs)}")
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "size": size,
                                                   "steps": args.steps, "seeds": args.seeds, "results": results,
                                                   "quantized_vs_bf16_lora_loss": paired,
                                                   "runs": runs}, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, losses in curves.items():
            if losses:
                ax.plot(torch.tensor(losses).unfold(0, 10, 1).mean(1) if len(losses) > 10 else losses, label=name)
        ax.set(xlabel="step", ylabel="training loss (10-step mean)", yscale="log",
               title="E2E-style data-to-text: LoRA vs full fine-tuning")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=120)
        print(f"loss curves: {out / 'loss_curves.png'}")
    except ImportError:
        print("matplotlib not installed: no loss-curve PNG")


if __name__ == "__main__":
    main()
