"""lora_fx's main job, end to end: adapt -> train -> fold -> export -> verify -> run on ONNX Runtime.

1. "Pretrain" a small GPT (examples/tiny_gpt.py) on CPython's help text, so it has something to adapt.
2. Adapt it with rules (LoRA on the attention q/v and the MLP; the output head excluded).
3. Train only A and B on a data-to-text task (E2E NLG style) until the loss falls clearly.
4. Fold B·A into the weights: the folded graph is the original graph.
5. Export the original and the merged model to ONNX, verify their graphs are identical, and run both on ONNX
   Runtime (CUDA provider when there is a GPU) against PyTorch.

    python examples/quickstart.py [--steps 150] [--out out/quickstart]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import lora_fx  # noqa: E402
from lora_fx import Rule  # noqa: E402
from tiny_gpt import TinyGPT, e2e_batch, e2e_split, encode, lm_loss, pydoc_corpus, random_windows  # noqa: E402


def train(model, params, batches, steps: int, lr: float, device: str) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        ids = batches().to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = lm_loss(model(ids), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def eval_loss(model, examples, device, gen_seed=1) -> float:
    gen = torch.Generator().manual_seed(gen_seed)
    ids = e2e_batch(examples, 32, 64, gen).to(device)
    return lm_loss(model(ids), ids).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="out/quickstart")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'no GPU'}), "
          f"torch {torch.__version__}")

    # 1. a small GPT that knows some English
    model = TinyGPT(d=64, layers=2, ctx=64).to(device)
    corpus = encode(pydoc_corpus())
    t0 = time.perf_counter()
    losses = train(model, list(model.parameters()), lambda: random_windows(corpus, 16, 64, gen),
                   args.pretrain_steps, 3e-3, device)
    print(f"pretrained {sum(p.numel() for p in model.parameters()):,} parameters on pydoc text: "
          f"loss {losses[0]:.2f} -> {losses[-1]:.2f} in {time.perf_counter() - t0:.0f} s")
    model.eval()

    # 2. adapt with rules
    train_set, test_set = e2e_split()
    example = (e2e_batch(train_set, 2, 64, gen).to(device),)
    rules = [Rule(name="head", exclude=True),
             Rule(name="q_proj|v_proj", r=8, alpha=16),
             Rule(name="up|down", r=4, alpha=8)]
    plan = lora_fx.plan(model, rules, example_inputs=example)
    print("\n".join(plan.table().splitlines()[:8] + ["..."] + plan.table().splitlines()[-1:]))
    adapted = lora_fx.adapt(model, rules, example_inputs=example)
    trainable = sum(p.numel() for p in lora_fx.lora_parameters(adapted))
    total = sum(p.numel() for p in adapted.parameters())
    print(f"sites adapted: {len(adapted.lora_fx)}; trainable parameters: {trainable:,} "
          f"({100 * trainable / total:.2f}% of {total:,})")
    with torch.no_grad():
        assert torch.equal(adapted(example[0]), model(example[0])), "adapted model must start equal"

    # 3. train only A and B on the data-to-text task
    base_test = eval_loss(model, test_set, device)
    adapted.train()
    t0 = time.perf_counter()
    losses = train(adapted, list(lora_fx.lora_parameters(adapted)), lambda: e2e_batch(train_set, 16, 64, gen),
                   args.steps, 3e-3, device)
    adapted.eval()
    print(f"LoRA training: loss {losses[0]:.3f} -> {statistics.mean(losses[-20:]):.3f} (mean of last 20 steps) "
          f"in {time.perf_counter() - t0:.0f} s; held-out loss {base_test:.3f} -> "
          f"{eval_loss(adapted, test_set, device):.3f}")

    # 4. fold
    merged = lora_fx.fold(adapted)
    with torch.no_grad():
        fold_err = (merged(example[0]) - adapted(example[0])).abs().max().item()
    print(f"fold: max |merged - adapted| = {fold_err:.2e} (fp32)")

    # 5. export both, verify identity, run on ONNX Runtime
    cpu_model, cpu_merged = model.cpu(), merged.cpu()
    x = (example[0].cpu(),)
    base_path = lora_fx.export_onnx(cpu_model, out / "base.onnx", x, dynamic=True)
    merged_path = lora_fx.export_onnx(cpu_merged, out / "merged.onnx", x, dynamic=True)
    report = lora_fx.verify_onnx(base_path, merged_path)
    print(report)
    print(f"identical={report.identical}")
    parity = lora_fx.check_parity(merged_path, cpu_merged, x)
    print(f"ONNX Runtime ({parity.provider}) vs PyTorch: max abs error {parity.max_abs_err:.2e} "
          f"(atol {parity.atol:g}) ok={parity.ok}")
    from lora_fx.onnx.runtime import ort_session, time_session
    batch = (e2e_batch(test_set, 8, 64, gen),)
    times = {}
    for name, path in (("base", base_path), ("merged", merged_path)) * 2:  # alternate to spread drift
        times.setdefault(name, []).extend(time_session(ort_session(path), batch, warmup=5, iters=30))
    base_ms, merged_ms = (1e3 * statistics.median(times[k]) for k in ("base", "merged"))
    print(f"latency (batch 8, seq 64, median): base {base_ms:.3f} ms, merged {merged_ms:.3f} ms, "
          f"ratio {merged_ms / base_ms:.3f}")
    if not (report.identical and parity.ok):
        sys.exit("verification failed")


if __name__ == "__main__":
    main()
