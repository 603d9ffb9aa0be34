"""Fold pass: W0 <- W0 + Σ (alpha/r)·B·A over the enabled LoRAs, then remove every LoRA node and module.

The sum is accumulated in fp32 for 16-bit weights and fp64 for fp32 weights (or as requested) and rounded once
into W0's dtype. Every A and B, and every new weight (W0 + delta can overflow fp16), is checked finite before
anything is written, so a refused fold changes nothing. The folded graph is
checked node for node against the graph adapt traced: fold gives back the original graph or raises.

merge_adapter / unmerge_adapter switch adapters in place on an adapted graph: merging writes W0 + delta into W0
(keeping an exact copy of W0 unless told not to) and disables the merged branches; unmerging restores W0 bit for bit.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Iterator

import torch
from torch import fx, nn

from lora_fx.errors import FoldError
from lora_fx.passes.infra import PassResult, clone_graph_module, first_difference, graph_signature, \
    module_copy_on_write, set_parameter_copy_on_write, shallow_clone
from lora_fx.passes.causal_attention import restore_attention
from lora_fx.passes.quantize_base import restore as restore_quantized_calls
from lora_fx.state import ADD, BRANCH, container_name, find_state


def _check_finite(chosen: list) -> None:
    """Raise on the first A or B holding NaN/Inf. One device sync for all of them (a check per tensor would wait for
    the device once per tensor, which dominated fold's arithmetic on a GPU)."""
    tensors = [(name, key, lora, pname) for name, key, lora in chosen for pname in ("lora_A", "lora_B")]
    if not tensors:
        return
    flags = [torch.isfinite(getattr(lora, pname)).all() for _, _, lora, pname in tensors]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).cpu()  # the one wait for the device
    if bool(finite.all()):
        return
    for (name, key, lora, pname), ok in zip(tensors, finite.tolist()):
        if not ok:
            raise FoldError(
                f"{pname} of the LoRA on {lora.weight_name!r} holds NaN or Inf; nothing was folded",
                where=f"{container_name(name)}.{key}.{pname}",
                fix="training diverged: lower the learning rate, use gradient clipping, or reload a good adapter")


def accumulation_dtype(weight_dtype: torch.dtype, requested: torch.dtype | None = None) -> torch.dtype:
    """fp32 for 16-bit weights, fp64 for fp32 weights (so the result is W0 + delta rounded once), or as requested
    (never below the weight's own precision)."""
    default = torch.float64 if torch.finfo(weight_dtype).bits >= 32 else torch.float32
    chosen = requested or default
    return max(chosen, weight_dtype, key=lambda d: torch.finfo(d).bits)


def folded_weights(gm: fx.GraphModule, adapters: list[str] | None = None,
                   accumulate_dtype: torch.dtype | None = None,
                   base_weight: Callable[[str], torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(weight name, W0 + Σ deltas rounded once to W0's dtype) over the enabled LoRAs of `adapters` (None: all).
    base_weight(name) gives W0 where it is not the parameter itself (a quantized base: lora_fx.quantize).

    Checks every A and B for NaN/Inf first (raising before anything is computed), then yields one weight at a
    time, so only one weight's high-precision sum is alive at once."""
    state = find_state(gm)
    chosen = [(name, key, lora) for name, container in state.containers(gm).items()
              if adapters is None or name in adapters for key, lora in container.items() if lora.enabled]
    _check_finite(chosen)
    by_weight: dict[str, list] = {}
    for _, _, lora in chosen:
        by_weight.setdefault(lora.weight_name, []).append(lora)
    return _sums(by_weight, accumulate_dtype, base_weight or gm.get_parameter)


def check_folded_finite(gm: fx.GraphModule, weights, keep: bool) -> list[tuple[str, torch.Tensor]]:
    """Raise FoldError when a folded weight holds Inf/NaN (W0 + delta overflowed W0's dtype, e.g. fp16's 65504).

    `weights` is folded_weights' iterator; one device sync for all of them. keep=True returns the (name, weight)
    pairs; keep=False drops each weight once checked (an in-place fold computes them again to write them, rather
    than hold a second copy of every adapted weight)."""
    kept, flags = [], []
    for name, value in weights:
        flags.append((name, torch.isfinite(value).all()))
        if keep:
            kept.append((name, value))
    if not flags:
        return kept
    finite = torch.stack([f.to(flags[0][1].device) for _, f in flags]).cpu()  # the one wait for the device
    for (name, _), ok in zip(flags, finite.tolist()):
        if not ok:
            w0 = gm.get_parameter(name)
            already = "" if bool(torch.isfinite(w0).all()) else " (W0 itself already holds NaN or Inf)"
            dtype = str(w0.dtype).removeprefix("torch.")
            raise FoldError(
                f"the folded weight {name!r} = W0 + scale·B·A holds NaN or Inf in {dtype}{already}; nothing was folded",
                where=name,
                fix=(f"W0 + delta exceeds the range of {w0.dtype}: fold a float32 or bfloat16 copy of the model (cast "
                     f"it before lora_fx.adapt), or " if w0.dtype in (torch.float16, torch.float8_e4m3fn,
                                                                     torch.float8_e5m2) else "")
                    + ("W0 already holds NaN or Inf: load finite base weights" if already else
                       "the adapter diverged: lower alpha or the learning rate, or reload a good adapter"))
    return kept


def _sums(by_weight, accumulate_dtype, base_weight) -> Iterator[tuple[str, torch.Tensor]]:
    with torch.no_grad():
        for weight, loras in by_weight.items():
            w0 = base_weight(weight)
            acc = accumulation_dtype(w0.dtype, accumulate_dtype)
            total = w0.detach().to(acc, copy=True)  # never a view of W0
            for lora in loras:
                lora.add_delta_(total)
            yield weight, total.to(w0.dtype)


def strip_lora_nodes(graph: fx.Graph) -> int:
    """Erase every LoRA branch and add node, giving each add's users back the base node."""
    removed = 0
    for node in reversed(list(graph.nodes)):
        tag = node.meta.get("lora_fx")
        if tag and tag[0] == ADD:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    for node in reversed(list(graph.nodes)):
        tag = node.meta.get("lora_fx")
        if tag and tag[0] == BRANCH:
            graph.erase_node(node)
            removed += 1
    return removed


def _not_adapted(gm) -> FoldError:
    return FoldError("this module was not adapted by lora_fx (no LoRA state on it)",
                     where=type(gm).__name__, fix="pass the module that lora_fx.adapt returned")


def _folded_graph(gm: fx.GraphModule) -> tuple[fx.Graph, int, int]:
    """A copy of gm's graph without its LoRA nodes and with its masked attention back, checked equal node for node
    to the graph adapt traced: fold gives back the original graph or raises."""
    graph = copy.deepcopy(gm.graph)
    # kept calls name their inputs, which may be LoRA add nodes (b(a(x)) with a adapted): restore them first
    restore_quantized_calls(graph)  # quantized weights' linear calls back as traced
    restored = restore_attention(graph)  # SDPA calls adapt switched to is_causal get their mask back
    removed = strip_lora_nodes(graph)
    difference = first_difference(find_state(gm).original_graph, graph_signature(graph))
    if difference is not None:  # a bug in lora_fx, never the user's: say so loudly
        raise FoldError(f"the folded graph differs from the traced original: {difference}",
                        where=type(gm).__name__, fix="please report this as a lora_fx bug")
    return graph, removed, restored


def check_folded_graph(gm: fx.GraphModule) -> None:
    """The node-for-node check of one captured graph (lora_fx.fold runs it on every graph of an adapted model)."""
    _folded_graph(gm)


def fold_model(adapted: nn.Module, model: nn.Module, *, inplace: bool = False, adapters: list[str] | None = None,
               accumulate_dtype: torch.dtype | None = None,
               base_weight: Callable[[str], torch.Tensor] | None = None, plain: tuple[str, ...] = ()) -> nn.Module:
    """The user's `model` with the adapted model's LoRA folded in and the modules trained in full written back.

    inplace=False: a shallow copy of `model` whose folded weights are new tensors (modules on their paths cloned,
    everything else shared); inplace=True: writes into `model`'s own weights and turns the adapter off in
    `adapted` (its branches would add the delta a second time). base_weight(name): W0 where the parameter is not
    it (a quantized base); plain: weights written as base_weight gives them (quantized ones without a LoRA)."""
    state = find_state(adapted)
    new_weights = folded_weights(adapted, adapters, accumulate_dtype, base_weight)  # checks A, B first
    if inplace:  # checked in a first pass, written in a second: no weight is written unless all are finite
        check_folded_finite(adapted, new_weights, keep=False)
        new_weights = folded_weights(adapted, adapters, accumulate_dtype, base_weight)
    else:
        new_weights = check_folded_finite(adapted, new_weights, keep=True)
    target = model if inplace else shallow_clone(model)
    trained = [(f"{m}.{n}", p) for m in state.modules_to_save for n, p in adapted.get_submodule(m).named_parameters()]
    folded = {name for name, _ in new_weights} if not inplace else set()
    as_is = [(name, base_weight(name).detach().clone()) for name in plain if name not in folded]
    with torch.no_grad():
        for name, value in [*new_weights, *((n, p.detach().clone()) for n, p in trained), *as_is]:
            if inplace and name not in state.untied:
                target.get_parameter(name).copy_(value)
            else:
                set_parameter_copy_on_write(target, name, value)
    if inplace:
        for container in state.containers(adapted).values():
            for lora in container.values():
                lora.enabled = False
    _take_modes(target, adapted, inplace)
    return target


def _take_modes(target: nn.Module, adapted: nn.Module, inplace: bool) -> None:
    """Give the folded model the train/eval mode of each of the adapted model's modules: the user switches the
    adapted model (adapted.eval() before evaluating), whose modules are not the user's model's own, so the model
    fold starts from may still be in the mode it had at adapt. Unless inplace, a module whose mode changes is cloned
    first (with the modules on its path), so the user's model keeps its own."""
    modes = {name: module.training for name, module in adapted.named_modules()}
    changed = [name for name, module in target.named_modules() if modes.get(name, module.training) != module.training]
    cloned: set[int] = set()
    for name in changed:
        module = target.get_submodule(name) if inplace else module_copy_on_write(target, name, cloned)
        module.training = modes[name]


def fold(gm: fx.GraphModule, *, inplace: bool = False, adapters: list[str] | None = None,
         accumulate_dtype: torch.dtype | None = None) -> PassResult:
    """Fold an adapted GraphModule. inplace=False returns a new module (folded weights are new tensors, the others
    shared) and leaves `gm` adapted; inplace=True writes into W0 and strips `gm` itself.

    `adapters` names the adapters to fold (None: every enabled one); the others are dropped."""
    state = find_state(gm)
    if state is None:
        raise _not_adapted(gm)
    new_weights = folded_weights(gm, adapters, accumulate_dtype)  # checks A, B before anything changes
    if inplace:  # checked in a first pass, written in a second: no weight is written unless all are finite
        check_folded_finite(gm, new_weights, keep=False)
        new_weights = folded_weights(gm, adapters, accumulate_dtype)
    else:  # the new module holds the new weights anyway
        new_weights = check_folded_finite(gm, new_weights, keep=True)

    graph, removed, restored = _folded_graph(gm)  # checked before any module changes; its code generated once
    target = gm if inplace else clone_graph_module(gm, graph=graph)
    if inplace:
        gm.graph = graph  # the setter generates the code
    folded = []
    with torch.no_grad():
        for name, value in new_weights:
            folded.append(name)
            if inplace and name not in state.untied:
                target.get_parameter(name).copy_(value)
            else:
                set_parameter_copy_on_write(target, name, value)
    for adapter in state.adapters:
        target._modules.pop(container_name(adapter), None)
    if inplace:
        target.meta.pop("lora_fx", None)
    changes = [f"folded the LoRA of {name}" for name in folded] + [f"removed {removed} LoRA nodes"]
    changes += [f"restored {restored} masked attention calls"] if restored else []
    return PassResult(target, True, changes)


def merge_adapter(gm: fx.GraphModule, adapter: str, *, keep_original: bool = True,
                  accumulate_dtype: torch.dtype | None = None) -> PassResult:
    """Write adapter's delta into W0 in place and disable its branches, keeping the graph adapted.

    keep_original=True keeps an exact copy of each W0 it changes (memory: one copy of those weights) so
    unmerge_adapter restores them bit for bit; False subtracts the delta again on unmerge (rounding error)."""
    state = find_state(gm)
    if state is None:
        raise _not_adapted(gm)
    if adapter not in state.adapters:
        raise FoldError(f"no adapter named {adapter!r}", where=type(gm).__name__,
                        fix=f"use one of {sorted(state.adapters)}")
    if state.quantized:
        raise FoldError("the base weights are quantized (lora_fx.quantize_base): merging into them would quantize "
                        "the adapter too", where=type(gm).__name__,
                        fix="switch adapters with set_adapter, or fold the model (lora_fx.fold) to merge for good")
    if state.merged:
        raise FoldError(f"adapter {state.merged[-1]!r} is merged already", where=type(gm).__name__,
                        fix="call lora_fx.unmerge_adapter first, then merge the next one")
    container = state.containers(gm)[adapter]
    if not any(l.enabled for l in container.values()):
        raise FoldError(f"adapter {adapter!r} is disabled", where=type(gm).__name__,
                        fix=f"enable it with lora_fx.set_adapter(adapted, {adapter!r})")
    merged = []
    check_folded_finite(gm, folded_weights(gm, [adapter], accumulate_dtype), keep=False)  # before any write
    with torch.no_grad():
        for name, value in folded_weights(gm, [adapter], accumulate_dtype):
            merged.append(name)
            w = gm.get_parameter(name)
            if keep_original:
                state.originals[name] = w.detach().clone()
            w.copy_(value)
    for lora in container.values():
        lora.enabled = False
    state.merged.append(adapter)
    return PassResult(gm, True, [f"merged {adapter!r} into {merged}"])


def unmerge_adapter(gm: fx.GraphModule, accumulate_dtype: torch.dtype | None = None) -> PassResult:
    """Take the merged adapter back out of W0 (exactly, when merge kept the originals) and re-enable it."""
    state = find_state(gm)
    if state is None:
        raise _not_adapted(gm)
    if not state.merged:
        raise FoldError("no adapter is merged", where=type(gm).__name__,
                        fix="call lora_fx.merge_adapter(adapted, name) first")
    adapter = state.merged.pop()
    container = state.containers(gm)[adapter]
    with torch.no_grad():
        if state.originals:
            for name, original in state.originals.items():
                gm.get_parameter(name).copy_(original)
            state.originals.clear()
        else:
            warnings.warn("lora_fx: unmerging by subtraction (merge_adapter ran with keep_original=False): "
                          "W0 comes back within rounding error, not bit for bit", stacklevel=2)
            for lora in container.values():
                w = gm.get_parameter(lora.weight_name)
                acc = accumulation_dtype(w.dtype, accumulate_dtype)
                w.copy_(lora.add_delta_(w.to(acc, copy=True), alpha=-1.0).to(w.dtype))
    for lora in container.values():
        lora.enabled = True
    return PassResult(gm, True, [f"unmerged {adapter!r}"])
