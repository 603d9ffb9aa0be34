"""An optional helper for the usual LoRA training loop, and mixed precision set-up. Bring your own loop at will:

    adapted = lora_fx.prepare_mixed_precision(adapted, torch.bfloat16)   # base in bf16, A and B stay fp32
    opt = torch.optim.AdamW(lora_fx.lora_parameters(adapted), lr=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(adapted, batch)
    loss.backward(); opt.step(); opt.zero_grad()

or, with the helper:

    history = lora_fx.train(adapted, batches, lambda m, b: F.cross_entropy(m(b["x"]), b["y"]),
                            steps=200, lr=1e-3, device="cuda", dtype=torch.bfloat16)

`train` accepts the adapted module itself or a DistributedDataParallel / torch.compile wrapper of it (the forward
goes through the wrapper, the optimizer gets the inner module's A and B).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lora_fx.state import adapted_state
from lora_fx.errors import InputError, LoraFxError
from lora_fx.site_kinds import BRANCHES, kind_of



def _lora_params(model: nn.Module) -> list[nn.Parameter]:
    """A and B of every enabled adapter (lora_fx.lora_parameters), without duplicates."""
    from lora_fx.api import lora_parameters

    gm, _ = adapted_state(model, what="train")
    seen, out = set(), []
    for p in lora_parameters(gm):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


CAST_CHOICES = ("linear", "matrices", "all")


def _linear_only_weights(gm: nn.Module, state: Any) -> set[int]:
    """ids of the parameters whose every use in the graph is as the weight of a linear-like site.

    Under autocast those ops compute in the low dtype anyway, so storing their weights in it changes no activation's
    dtype. Other weights (embeddings, a weight tied to an embedding) would: torch.export graphs pin dtypes with
    aten._assert_tensor_metadata, and the model's arithmetic would change."""
    site_weight = {s.node: s.weight for s in getattr(state, "sites", []) if kind_of(s).name == "linear"}
    ok: dict[int, bool] = {}

    def use(p: Any, fine: bool) -> None:
        if isinstance(p, nn.Parameter):
            ok[id(p)] = ok.get(id(p), True) and fine

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                p = gm.get_parameter(node.target)
            except AttributeError:
                continue
            use(p, bool(node.users) and all(
                u.name in site_weight and site_weight[u.name] == node.target for u in node.users))
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, BRANCHES):
                continue
            for pname, p in module.named_parameters():
                use(p, node.name in site_weight and site_weight[node.name] == f"{node.target}.{pname}")
    return {i for i, fine in ok.items() if fine}


def prepare_mixed_precision(adapted: nn.Module, base_dtype: torch.dtype = torch.bfloat16, *,
                            lora_dtype: torch.dtype = torch.float32, cast: str = "linear",
                            cast_buffers: bool = False) -> nn.Module:
    """Store the base weights in `base_dtype` (bf16/fp16) and keep every LoRA A/B in `lora_dtype` (fp32).

    Run the forward under torch.autocast(device_type, dtype=base_dtype) (train(dtype=...) does). The base parameters
    are the user's model's own tensors (adapt makes no copies), so the cast applies to that model too, as
    model.to(dtype) would; it halves their memory.
    cast="linear" (default): only weights used solely by linear-like ops (nn.Linear, F.linear, matmul, Conv1D),
    which autocast computes in the low dtype anyway: the model computes exactly as under autocast alone, and the
    graphs of both front ends stay valid (torch.export graphs pin activation dtypes, which a bf16 embedding
    table would break). Embeddings, norms and biases keep their dtype.
    cast="matrices": every parameter with 2 or more dimensions (embeddings too; fine for symbolic-trace graphs).
    cast="all": every floating-point parameter. cast_buffers=True also casts floating-point buffers.
    Returns `adapted`."""
    if not (isinstance(base_dtype, torch.dtype) and base_dtype.is_floating_point):
        raise InputError(f"base_dtype must be a floating-point torch dtype, got {base_dtype!r}", where="base_dtype",
                         fix="use torch.bfloat16 or torch.float16")
    if cast not in CAST_CHOICES:
        raise InputError(f"unknown cast={cast!r}", where="cast", fix=f"use one of {list(CAST_CHOICES)}")
    owner, state = adapted_state(adapted, what="prepare mixed precision for")
    from lora_fx.api import graph

    gm = graph(owner)
    lora_ids = {id(p) for m in owner.modules() if isinstance(m, BRANCHES) for p in m.parameters()}
    linear_ids = _linear_only_weights(gm, gm.meta["lora_fx"]) if cast == "linear" else set()

    def wanted(p: nn.Parameter) -> bool:
        if not p.is_floating_point() or p.dtype == base_dtype:
            return False
        return id(p) in linear_ids if cast == "linear" else (cast == "all" or p.dim() >= 2)

    with torch.no_grad():
        for module in owner.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) in lora_ids:
                    if p.dtype != lora_dtype:
                        p.data = p.data.to(lora_dtype)
                elif wanted(p):
                    p.data = p.data.to(base_dtype)
            if cast_buffers:
                for name, b in list(module._buffers.items()):
                    if b is not None and b.is_floating_point():
                        module._buffers[name] = b.to(base_dtype)
    if cast != "linear" or cast_buffers:  # graphs that pin other tensors' dtypes are captured again
        calls = owner.__dict__.get("_lora_fx_calls")
        if calls is not None:
            calls.clear()
    return adapted


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    return torch.utils._pytree.tree_map(
        lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="lora_fx train", unit="step", leave=False)


def train(adapted: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, Any], torch.Tensor], *, steps: int,
          lr: float = 1e-3, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
          grad_clip: float | None = 1.0, progress: bool = True, weight_decay: float = 0.0,
          optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """Train only the LoRA weights for `steps` steps; returns the loss of every step.

    batches: any iterable of batches (re-iterated when exhausted, e.g. a list or a DataLoader; a one-shot iterator
    that runs out ends training early). loss_fn(model, batch) -> scalar loss, called with `adapted` (or its wrapper).
    device: moves the model and every tensor of each batch there. dtype: bf16/fp16 runs the forward under
    torch.autocast (use prepare_mixed_precision first to also store the base in that dtype); fp16 uses a
    GradScaler. grad_clip: max gradient norm (None or 0: no clipping). optimizer: defaults to AdamW on A and B.
    Raises LoraFxError when the loss becomes NaN/Inf (the step is not applied)."""
    if not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps must be a non-negative int, got {steps!r}", where="steps", fix="use e.g. steps=100")
    params = _lora_params(adapted)
    if not params:
        raise InputError("the adapted module has no trainable LoRA parameter", where="adapted",
                         fix="do not freeze lora_A / lora_B (requires_grad must stay True)")
    device = torch.device(device) if device is not None else None
    if device is not None:
        adapted.to(device)
    device_type = (device or params[0].device).type
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}",
                         where="dtype", fix="use dtype=torch.bfloat16")
    autocast = dtype is not None and dtype != torch.float32
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device_type, enabled=autocast and dtype == torch.float16)

    history: list[float] = []
    flags = {m: m.training for m in adapted.modules()}  # restored afterwards, module by module
    adapted.train()
    bar = _progress(steps, progress)
    source = iter(batches)
    try:
        for step in range(steps):
            try:
                batch = next(source)
            except StopIteration:
                if iter(batches) is batches:  # a one-shot iterator: nothing more to read
                    break
                source = iter(batches)
                try:
                    batch = next(source)
                except StopIteration:
                    raise InputError("batches is empty", where="batches", fix="pass at least one batch") from None
            batch = _to_device(batch, device)
            with torch.autocast(device_type, dtype=dtype, enabled=autocast):
                loss = loss_fn(adapted, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise InputError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                                 + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""),
                                 where="loss_fn", fix="return e.g. F.cross_entropy(...) (reduced to one number)")
            value = float(loss.detach())
            if not math.isfinite(value):
                raise LoraFxError(f"the loss is {value} at step {step}; the step was not applied",
                                  where=f"step {step}", fix="lower the learning rate, keep grad_clip, or use bf16 "
                                                            "instead of fp16")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(opt)
            scaler.update()
            history.append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
    finally:
        if bar is not None:
            bar.close()
        for m, flag in flags.items():
            m.training = flag
    return history
