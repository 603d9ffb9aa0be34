"""Training: bf16 mixed precision on CPU, torch.compile(fullgraph=True) with no graph breaks, DDP and FSDP2 on 2 CPU
processes (gloo)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx.adapter_file import load_adapter, save_adapter
from lora_fx.errors import AdapterFileError, LoraFxError
from lora_fx.training import prepare_mixed_precision, train

from conftest import gloo_rank, spawn_fsdp2


class Net(nn.Module):
    def __init__(self, d: int = 16, classes: int = 4):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.v = nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.ln(x)
        h = h + torch.relu(self.q(h)) * self.v(h)
        return self.head(h)


RULES = [lora_fx.Rule(name="q|v|head", r=4, alpha=8)]


def make(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net()


def data(n: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def base_params(adapted) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapted.named_parameters() if not n.startswith("lora_fx.")}


# ---------------------------------------------------------------------------------------------------- mixed precision
def test_bf16_mixed_precision_on_cpu():
    x, y = data()
    adapted = lora_fx.adapt(make(), RULES, example_inputs=(x,))
    prepare_mixed_precision(adapted, torch.bfloat16)
    for name, p in adapted.named_parameters():
        if name.startswith("lora_fx."):
            assert p.dtype == torch.float32 and p.requires_grad, name
        elif p.dim() >= 2:
            assert p.dtype == torch.bfloat16 and not p.requires_grad, name
        else:  # norm scales and biases stay fp32
            assert p.dtype == torch.float32 and not p.requires_grad, name
    before = base_params(adapted)

    # one step of a user's own loop under autocast: gradients reach A and B only, in fp32
    opt = torch.optim.AdamW(lora_fx.lora_parameters(adapted), lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(adapted(x).float(), y)
    loss.backward()
    for name, p in adapted.named_parameters():
        if name.startswith("lora_fx."):
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in lora_fx.lora_parameters(adapted))
    opt.step()

    # the helper: loss falls, LoRA stays fp32, the base does not move
    adapted.eval()
    history = train(adapted, [(x, y)], ce, steps=40, lr=1e-2, dtype=torch.bfloat16, progress=False)
    assert len(history) == 40 and history[-1] < 0.6 * history[0], history
    assert all(p.dtype == torch.float32 for p in lora_fx.lora_parameters(adapted))
    assert all(torch.equal(before[n], p) for n, p in base_params(adapted).items())
    assert not any(m.training for m in adapted.modules())  # the helper restores the modules' modes


def test_mixed_precision_keeps_export_graphs_valid():
    """torch.export graphs pin activation dtypes (aten._assert_tensor_metadata): only weights used solely by
    linear-like ops are stored in bf16, so the graph computes exactly as under autocast alone."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    def model():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)).eval()

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    adapted = lora_fx.adapt(model(), [lora_fx.Rule(name="c_attn", r=4)], example_inputs=(ids,),
                            example_kwargs={"use_cache": False}, frontend="export")
    with torch.no_grad():
        adapted.lora_fx.transformer_h_0_attn_c_attn.lora_B.normal_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_only = adapted(ids, use_cache=False).logits
    prepare_mixed_precision(adapted, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in adapted.named_parameters()}
    assert dtypes["transformer.h.0.attn.c_attn.weight"] == dtypes["transformer.h.0.mlp.c_fc.weight"] == torch.bfloat16
    assert dtypes["transformer.wte.weight"] == torch.float32  # an embedding (tied to lm_head): its output dtype counts
    assert dtypes["lora_fx.transformer_h_0_attn_c_attn.lora_A"] == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(adapted(ids, use_cache=False).logits, autocast_only)
    # the trace pass drops export's dtype asserts, so casting every matrix (the embedding too) runs as well
    assert not any(n.target is torch.ops.aten._assert_tensor_metadata.default for n in lora_fx.graph(adapted).graph.nodes)
    prepare_mixed_precision(adapted, torch.bfloat16, cast="matrices")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(adapted(ids, use_cache=False).logits.float()).all()


def test_train_helper_cycles_batches_and_stops_on_nan():
    x, y = data()
    adapted = lora_fx.adapt(make(), RULES, example_inputs=(x,))
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    seen = []
    history = train(adapted, batches, lambda m, b: (seen.append(b[0].shape[0]), ce(m, b))[1], steps=5,
                    progress=True)
    assert len(history) == 5 and len(seen) == 5  # re-iterates the list
    lora = {k: v.clone() for k, v in lora_fx.lora_state_dict(adapted).items()}
    with pytest.raises(LoraFxError, match="the loss is nan at step 0"):
        train(adapted, batches, lambda m, b: ce(m, b) * float("nan"), steps=3, progress=False)
    assert all(torch.equal(lora[k], v) for k, v in lora_fx.lora_state_dict(adapted).items())  # step not applied
    assert len(train(adapted, iter(batches), ce, steps=5, progress=False)) == 2  # a one-shot iterator runs out


# ---------------------------------------------------------------------------------------------------- torch.compile
def _adapt(frontend: str):
    x, y = data(16)
    return lora_fx.adapt(make(), RULES, example_inputs=(x,), frontend=frontend), x, y


def _check_compiled(frontend: str, backend: str) -> None:
    import torch._dynamo

    adapted, x, y = _adapt(frontend)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_B.normal_()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(adapted)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(adapted, fullgraph=True, backend=backend)  # fullgraph: a break would raise
    eager_loss = ce(adapted, (x, y))
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in lora_fx.lora_parameters(adapted)]
    adapted.zero_grad(set_to_none=True)
    loss = ce(compiled, (x, y))
    loss.backward()
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, p in zip(eager_grads, lora_fx.lora_parameters(adapted)):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for n, p in adapted.named_parameters() if not n.startswith("lora_fx."))
    history = train(compiled, [(x, y)], ce, steps=5, lr=1e-2, progress=False)  # the helper takes the wrapper
    assert history[-1] < history[0]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_compile_fullgraph_without_graph_breaks(frontend):
    # aot_eager runs dynamo (where graph breaks happen) and AOTAutograd, without Inductor's C++ build time
    _check_compiled(frontend, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_compile_fullgraph_inductor(frontend):
    _check_compiled(frontend, "inductor")


# ---------------------------------------------------------------------------------------------------- DDP, 2 processes
def _adapted_on_every_rank():
    """The same adapted model on every rank (same seed: same base and A), with its base and LoRA values before."""
    x, _ = data(8)
    adapted = lora_fx.adapt(make(), RULES, example_inputs=(x,))
    return x, adapted, base_params(adapted), {k: v.clone() for k, v in lora_fx.lora_state_dict(adapted).items()}


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from safetensors.torch import save_file

    with gloo_rank(rank, world, init_file) as dist:
        x, adapted, before, lora_init = _adapted_on_every_rank()
        ddp = DDP(adapted)
        batches = [data(16, seed=100 + 10 * rank + i) for i in range(3)]  # each rank sees other data
        history = train(ddp, batches, ce, steps=6, lr=1e-2, progress=False)
        lora = lora_fx.lora_state_dict(adapted)
        equal = True
        for value in lora.values():
            gathered = [torch.empty_like(value) for _ in range(world)]
            dist.all_gather(gathered, value.contiguous())
            equal &= all(torch.equal(gathered[0], g) for g in gathered)
        result = {
            "history": history,
            "lora_equal_across_ranks": bool(equal),
            "lora_changed": any(not torch.equal(lora_init[k], v) for k, v in lora.items()),
            "base_unchanged": all(torch.equal(before[n], p) for n, p in base_params(adapted).items()),
        }
        save_file({k: v.contiguous() for k, v in lora.items()}, os.path.join(out, f"lora_rank{rank}.safetensors"))
        if rank == 0:
            save_adapter(ddp, os.path.join(out, "adapter"))
        dist.barrier()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


def test_ddp_two_processes_gloo(tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["lora_equal_across_ranks"] and r["lora_changed"] and r["base_unchanged"], r
    assert results[0]["history"][0] != results[1]["history"][0]  # the ranks really trained on different data
    assert sorted(os.listdir(out)) == ["adapter", "lora_rank0.safetensors", "lora_rank1.safetensors",
                                       "rank0.json", "rank1.json"]
    # the adapter rank 0 saved holds the weights both ranks ended with
    x, _ = data(8)
    fresh = lora_fx.adapt(make(), RULES, example_inputs=(x,))
    load_adapter(fresh, out / "adapter")
    rank1 = load_file(str(out / "lora_rank1.safetensors"))
    assert all(torch.equal(rank1[k], v) for k, v in lora_fx.lora_state_dict(fresh).items())


# -------------------------------------------------------------------------------------------------- FSDP2, 2 processes
def _fsdp2_worker(rank: int, world: int, init_file: str, out: str) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    with gloo_rank(rank, world, init_file) as dist:
        x, adapted, before, lora_init = _adapted_on_every_rank()
        fully_shard(adapted)  # every parameter becomes a DTensor sharded on dim 0: each rank keeps half the rows
        sharded = all(isinstance(p, DTensor) for p in adapted.parameters())
        opt = torch.optim.AdamW(lora_fx.lora_parameters(adapted), lr=2e-2)
        batch = data(16, seed=100 + 10 * rank)  # each rank sees other data
        history, grads_only_lora = [], True
        for _ in range(8):
            loss = ce(adapted, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads_only_lora &= all((p.grad is not None) == n.startswith("lora_fx.")
                                   for n, p in adapted.named_parameters())
            opt.step()
            history.append(loss.item())
        # FSDP2: a forward with grad enabled but no backward leaves the parameters unsharded and stale for the next
        # steps (a plain module behaves the same), so evaluation runs under no_grad
        with torch.no_grad():
            y_fsdp = adapted(x)

        state = lora_fx.lora_state_dict(adapted)  # sharded, as adapted.state_dict() is under FSDP2
        lora_full = {k: v.full_tensor() for k, v in state.items()}  # a collective: every rank, same order
        path = save_adapter(adapted, os.path.join(out, "adapter"))  # every rank: gathers; rank 0 writes
        # rank 0 cannot write (the path is a file): every rank raises, none waits forever
        blocker = os.path.join(os.path.dirname(out), "blocker")
        if rank == 0:
            open(blocker, "w").close()
        dist.barrier()
        expected = "the adapter path exists and is not a folder" if rank == 0 else "rank 0 could not write"
        with pytest.raises(AdapterFileError, match=expected):
            save_adapter(adapted, blocker)

        # a fresh, non-distributed adapted model with the file loaded holds the gathered A/B and gives the same
        # outputs: both compute in fp32 with the same values (all-gather copies bits), so only the kernels' summation
        # order could differ, by a few ulps (outputs are O(1)); in practice the difference is 0
        fresh = lora_fx.adapt(make(), RULES, example_inputs=(x,))
        load_adapter(fresh, path)
        with torch.no_grad():
            y_fresh = fresh(x)
        # the file loaded back into a sharded model: each rank takes its own shard
        fresh_fsdp = lora_fx.adapt(make(), RULES, example_inputs=(x,))
        fully_shard(fresh_fsdp)
        load_adapter(fresh_fsdp, path)
        with torch.no_grad():
            y_fresh_fsdp = fresh_fsdp(x)

        # fold: gather the full parameters (a collective), load them into a plain copy, fold that. Fold adds
        # (alpha/r)·B·A into W0 in fp64 and rounds once, while the adapted model adds the branch's fp32 output, so
        # the two differ by fp32 rounding (~1e-7 here)
        with pytest.raises(lora_fx.FoldError, match="sharded DTensors"):  # no half-usable sharded fold
            lora_fx.fold(adapted)
        with pytest.raises(AdapterFileError, match="sharded DTensors"):
            lora_fx.save_peft_adapter(adapted, os.path.join(out, f"peft{rank}"))
        full = get_model_state_dict(adapted, options=StateDictOptions(full_state_dict=True))
        plain = lora_fx.adapt(make(), RULES, example_inputs=(x,))
        plain.load_state_dict(full)
        folded = lora_fx.fold(plain)
        with torch.no_grad():
            y_folded = folded(x)

        result = {
            "history": history,
            "sharded": sharded,
            "lora_state_dict_sharded": all(isinstance(v, DTensor) for v in state.values()),
            "grads_only_lora": bool(grads_only_lora),
            "lora_changed": any(not torch.equal(lora_init[k], v) for k, v in lora_full.items()),
            "base_unchanged": all(torch.equal(before[n], p.full_tensor()) for n, p in base_params(adapted).items()),
            "file_equals_gathered": len(lora_full) == 6 and all(
                torch.equal(lora_full[k], v) for k, v in lora_fx.lora_state_dict(fresh).items()),
            "fresh_vs_fsdp": (y_fresh - y_fsdp).abs().max().item(),
            "fresh_fsdp_vs_fsdp": (y_fresh_fsdp - y_fsdp).abs().max().item(),
            "folded_vs_fsdp": (y_folded - y_fsdp).abs().max().item(),
            "y_fsdp": y_fsdp.tolist(),
        }
        save_file(lora_full, os.path.join(out, f"lora_rank{rank}.safetensors"))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


def test_fsdp2_two_processes_gloo(tmp_path):
    """FSDP2 (fully_shard) on 2 CPU processes: only A and B train, save_adapter gathers the shards, fold after
    gathering matches. The 2-GPU run is the same code with the nccl backend."""
    from safetensors.torch import load_file

    out, results = spawn_fsdp2(_fsdp2_worker, tmp_path)
    for r in results:
        assert r["sharded"] and r["lora_state_dict_sharded"], r
        assert r["grads_only_lora"] and r["lora_changed"] and r["base_unchanged"], r
        assert r["file_equals_gathered"], r
        assert r["fresh_vs_fsdp"] <= 1e-6 and r["fresh_fsdp_vs_fsdp"] <= 1e-6, r
        assert r["folded_vs_fsdp"] <= 1e-5, r
    assert results[0]["history"][0] != results[1]["history"][0]  # the ranks really trained on different data
    first, last = (sum(r["history"][i] for r in results) for i in (0, -1))
    assert last < 0.9 * first, [r["history"] for r in results]  # the mean loss falls (gradients are averaged)
    assert results[0]["y_fsdp"] == results[1]["y_fsdp"]  # one model, whichever rank runs it
    assert sorted(os.listdir(out)) == ["adapter", "lora_rank0.safetensors", "lora_rank1.safetensors",
                                       "rank0.json", "rank1.json"]
    # both ranks gathered the same A/B, and rank 0 wrote exactly those
    rank0, rank1 = (load_file(str(out / f"lora_rank{r}.safetensors")) for r in range(2))
    x, _ = data(8)
    fresh = lora_fx.adapt(make(), RULES, example_inputs=(x,))
    load_adapter(fresh, out / "adapter")
    assert all(torch.equal(rank0[k], v) and torch.equal(rank1[k], v) for k, v in lora_fx.lora_state_dict(fresh).items())
