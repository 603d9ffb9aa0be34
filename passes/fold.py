"""Fold pass: W0 <- W0 + (alpha/r)·B·A for every LoRA, then remove every LoRA node and module.

The sum is accumulated in fp32 (or fp64 on request) and rounded once into W0's dtype. Every new weight is
computed and checked (finite) before anything is written, so a refused fold changes nothing. The folded graph is
checked node for node against the graph adapt traced: fold gives back the original graph or raises.
"""

from __future__ import annotations

import torch
from torch import fx

from lora_fx.errors import FoldError
from lora_fx.passes.infra import PassResult, clone_graph_module, first_difference, graph_signature, \
    set_parameter_copy_on_write
from lora_fx.passes.inject import ADD, BRANCH, CONTAINER, lora_state


def folded_weights(gm: fx.GraphModule, accumulate_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{weight name: W0 + delta rounded once to W0's dtype} for every LoRA; refuses non-finite A or B."""
    container = getattr(gm, CONTAINER)
    new = {}
    for key, lora in container.items():
        for pname in ("lora_A", "lora_B"):
            p = getattr(lora, pname)
            if not torch.isfinite(p).all():
                raise FoldError(
                    f"{pname} of the LoRA on {lora.weight_name!r} holds NaN or Inf; nothing was folded",
                    where=f"{CONTAINER}.{key}.{pname}",
                    fix="training diverged: lower the learning rate, use gradient clipping, or reload a good adapter")
        w0 = gm.get_parameter(lora.weight_name)
        with torch.no_grad():
            acc = max(accumulate_dtype, w0.dtype, key=lambda d: torch.finfo(d).bits)
            new[lora.weight_name] = (w0.detach().to(acc) + lora.delta_weight(acc).to(w0.device)).to(w0.dtype)
    return new


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


def fold(gm: fx.GraphModule, *, inplace: bool = False,
         accumulate_dtype: torch.dtype = torch.float32) -> PassResult:
    """Fold an adapted GraphModule. inplace=False returns a new module (folded weights are new tensors, the others
    shared) and leaves `gm` adapted; inplace=True writes into W0 and strips `gm` itself."""
    state = lora_state(gm)
    if state is None or not hasattr(gm, CONTAINER):
        raise FoldError("this module was not adapted by lora_fx (no LoRA state on it)",
                        where=type(gm).__name__, fix="pass the module that lora_fx.adapt returned")
    new_weights = folded_weights(gm, accumulate_dtype)  # raises before anything changes

    target = gm if inplace else clone_graph_module(gm)
    removed = strip_lora_nodes(target.graph)
    difference = first_difference(state.original_graph, graph_signature(target.graph))
    if difference is not None:  # a bug in lora_fx, never the user's: say so loudly
        raise FoldError(f"the folded graph differs from the traced original: {difference}",
                        where=type(gm).__name__, fix="please report this as a lora_fx bug")
    with torch.no_grad():
        for name, value in new_weights.items():
            if inplace and name not in state.untied:
                target.get_parameter(name).copy_(value)
            else:
                set_parameter_copy_on_write(target, name, value)
    if inplace:
        target.delete_submodule(CONTAINER)
        target.meta.pop("lora_fx", None)
    else:
        target._modules.pop(CONTAINER, None)
    target.recompile()
    changes = [f"folded the LoRA of {name}" for name in new_weights] + [f"removed {removed} LoRA nodes"]
    return PassResult(target, True, changes)
