"""Small models shared by the tests. Everything runs for real on CPU: no mocks of torch, ONNX or ONNX Runtime."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx


class TinyBlock(nn.Module):
    """A transformer-like block using every kind of site: nn.Linear, matmul on a parameter, F.linear."""

    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.w_up = nn.Parameter(torch.randn(d, hidden) / d**0.5)  # stored (in, out): used as h @ w_up
        self.w_down = nn.Parameter(torch.randn(d, hidden) / hidden**0.5)  # stored (out, in): F.linear
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        h = self.ln(x + self.o(attn))
        return h + F.linear(torch.relu(h @ self.w_up), self.w_down)


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def block():
    torch.manual_seed(0)
    return TinyBlock(), (torch.randn(2, 5, 16),)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return TinyMLP(), (torch.randn(4, 8),)


def train_steps(adapted, args, steps: int = 10, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """A few AdamW steps of regression toward a fixed random target; returns the losses."""
    import lora_fx

    torch.manual_seed(seed)
    with torch.no_grad():
        target = torch.randn_like(adapted(*args))
    opt = torch.optim.AdamW(lora_fx.lora_parameters(adapted), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(adapted(*args), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def randomize_lora(adapted, scale: float = 0.1, seed: int = 0) -> None:
    """Give every B non-zero values, as training would, so folds have something to fold."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_B.normal_(0, scale)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, rather than hang, when the block runs longer than `seconds` (SIGALRM: Python's re checks for signals
    while it backtracks, so a regression to unbounded matching fails here instead of never returning)."""
    import signal

    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, init_file: str):
    """One rank of a multi-process CPU test: joins the gloo group, leaves it whatever happens."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def _run_then_exit(rank: int, worker, *args) -> None:
    """Run one rank, then leave without the interpreter's teardown: under load, gloo's threads can abort the process
    there ("terminate called without an active exception") after the rank's work and results are complete."""
    import os
    import sys

    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def sharded_and_reference_lora(view, adapted, reference, batches, rank: int, steps: int) -> float:
    """Train `view` (FSDP2-sharded, this rank's batch) and `reference` (one process, every rank's batch, losses
    averaged as FSDP2 averages gradients) side by side with AdamW; the largest difference of their LoRA weights."""
    opt = torch.optim.AdamW(lora_fx.lora_parameters(adapted), lr=1e-2)
    opt_ref = torch.optim.AdamW(lora_fx.lora_parameters(reference), lr=1e-2)
    for _ in range(steps):
        x, y = batches[rank]
        loss = F.mse_loss(view(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_ref = sum(F.mse_loss(reference(bx), by) for bx, by in batches) / len(batches)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
    ours = {k: v.full_tensor() for k, v in lora_fx.lora_state_dict(adapted).items()}
    ref = lora_fx.lora_state_dict(reference)
    return max((ours[k] - ref[k]).abs().max().item() for k in ref)


def spawn_fsdp2(worker, tmp_path, world: int = 2) -> tuple:
    """Run worker(rank, world, init_file, out) on `world` CPU processes (gloo), skipping where gloo or FSDP2
    (torch >= 2.6) is missing; returns the output folder and each rank's `rank{r}.json`."""
    import json

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available on this platform")
    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)")
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_run_then_exit, args=(worker, world, str(tmp_path / "init"), str(out)), nprocs=world, join=True)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def state_of(adapted):
    """The LoraState of an adapted model (or of a graph it captured)."""
    from lora_fx.state import adapted_state

    return adapted_state(adapted)[1]


def files(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones too: temporary files show up here) with its bytes."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


# Fixtures of the bad-input tests (tests/test_bad_*.py): an adapted TinyMLP in eval mode, and its saved adapter.
@pytest.fixture
def eval_mlp():
    torch.manual_seed(0)
    return TinyMLP().eval(), (torch.randn(4, 8),)


@pytest.fixture
def adapted(eval_mlp):
    model, args = eval_mlp
    a = lora_fx.adapt(model, example_inputs=args, r=4)
    with torch.no_grad():
        for lora in a.lora_fx.values():
            lora.lora_B.normal_(0, 0.1)
    return a


@pytest.fixture
def saved(adapted, tmp_path):
    """(folder of a saved adapter, its files' bytes)."""
    folder = lora_fx.save_adapter(adapted, tmp_path / "adapter")
    return folder, files(tmp_path)
