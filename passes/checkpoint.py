"""Checkpoint pass: a training view of an adapted graph that runs each repeated layer under activation checkpointing.

Why: with the base frozen, a LoRA step's memory is mostly activations (the optimizer holds only A and B). Keeping
fewer of them and recomputing the rest in the backward pass is how LoRA fits in half of full fine-tuning's memory.

How: every node of the adapted graph knows the module it came from (`nn_module_stack`, kept by both front ends and
by inject). Nodes of one item of the model's layer list (`model.layers.3`) form one partition; torch.fx's
`split_module` turns each into a submodule, called under torch.utils.checkpoint (non-reentrant, so RNG state, autocast
and dropout masks are replayed exactly). Two policies:

    "matmuls"  save the outputs of matmuls and attention, recompute everything else (norms, activations, RoPE,
               casts): memory-bound elementwise work, no matmul FLOPs repeated. The default.
    "full"     save only each layer's inputs and recompute the whole layer: least memory, one more forward.

The view shares every parameter and LoRA module with the adapted model; nothing of the adapted model changes.
Train the view; fold, save and export the adapted model as before.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from lora_fx.errors import InputError
from lora_fx.passes.infra import PassResult

POLICIES = ("matmuls", "full")


def _saved_ops() -> list:
    """Ops whose outputs the "matmuls" policy keeps: every matmul and fused-attention kernel this torch has."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"]
    return [getattr(aten, n).default for n in names if hasattr(aten, n)]


_LAYER = re.compile(r"^(?P<parent>.+)\.(?P<index>\d+)$")


def _module_paths(node: fx.Node) -> list[str]:
    """The modules a node came from, outermost first ("model", "model.layers", "model.layers.3", ...)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] for value in stack.values() if isinstance(value, tuple) and value and isinstance(value[0], str)]


def layer_lists(gm: fx.GraphModule) -> dict[str, int]:
    """Every module list the graph runs items of (`model.layers`), with how many distinct items its nodes use."""
    items: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        for path in _module_paths(node):
            m = _LAYER.match(path)
            if m:
                items.setdefault(m["parent"], set()).add(m["index"])
    return {parent: len(idx) for parent, idx in items.items()}


def _choose_layers(gm: fx.GraphModule, layers: str | None) -> str:
    lists = layer_lists(gm)
    if layers is not None:
        if layers not in lists:
            raise InputError(f"the graph runs no items of a module list {layers!r}", where="layers",
                             fix=f"pass one of {sorted(lists, key=lambda p: -lists[p])[:8]} or leave layers=None")
        return layers
    repeated = {p: n for p, n in lists.items() if n >= 2}
    if not repeated:
        raise InputError("found no repeated layers to checkpoint (no module list with 2 or more items in the graph)",
                         where=type(gm).__name__,
                         fix="checkpointing splits the graph at the items of a list of layers (nn.ModuleList, "
                             "nn.Sequential); for a model without one, train without it")
    # the list with the most items; among equals the outermost (shortest path)
    return min(repeated, key=lambda p: (-repeated[p], p.count(".")))


def _partitions(gm: fx.GraphModule, parent: str) -> tuple[dict[fx.Node, int], dict[int, str]]:
    """Node -> partition number, in graph order: a partition is a run of consecutive nodes of one layer, or of
    nodes outside every layer. Runs in graph order can only depend on earlier runs, so the split is always valid.
    A node without module information (inserted by a pass) stays in the run it sits in."""
    partition_of: dict[fx.Node, int] = {}
    layer_of_partition: dict[int, str] = {}
    current_key, current = object(), -1
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        paths = _module_paths(node)
        key = next((p for p in paths if (m := _LAYER.match(p)) and m["parent"] == parent), None)
        if not paths and current >= 0:
            key = current_key
        if key != current_key:
            current_key, current = key, current + 1
            if key is not None:
                layer_of_partition[current] = key
        partition_of[node] = current
    return partition_of, layer_of_partition


class CheckpointedLayer(nn.Module):
    """One layer's subgraph, run under torch.utils.checkpoint when gradients are on."""

    def __init__(self, layer: fx.GraphModule, name: str, policy: str):
        super().__init__()
        self.layer, self.name, self.policy = layer, name, policy

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.layer(*args)
        if self.policy == "full":
            return checkpoint(self.layer, *args, use_reentrant=False)
        context = functools.partial(create_selective_checkpoint_contexts, _saved_ops())
        return checkpoint(self.layer, *args, use_reentrant=False, context_fn=context)


class CheckpointedModel(nn.Module):
    """Training view of an adapted model: the same computation and parameters, layers under checkpointing.

    .adapted is the model it views (not a child module: its tensors are reachable through .split already).
    .train()/.eval() go to the adapted model, which switches only its LoRA branches."""

    def __init__(self, adapted: fx.GraphModule, split: fx.GraphModule, layers: list[str], policy: str):
        super().__init__()
        self.split = split
        self.__dict__["adapted"] = adapted
        self.layers, self.policy = layers, policy
        self.training = adapted.training

    def forward(self, *args, **kwargs):
        return self.split(*args, **kwargs)

    def train(self, mode: bool = True) -> "CheckpointedModel":
        self.adapted.train(mode)
        self.training = mode
        return self


@dataclass
class CheckpointResult(PassResult):
    view: CheckpointedModel | None = None
    layers: list[str] = field(default_factory=list)


def checkpoint_layers(adapted: fx.GraphModule, policy: str = "matmuls", layers: str | None = None) -> CheckpointResult:
    """Build the checkpointed training view of `adapted` (which is left as it was)."""
    if policy not in POLICIES:
        raise InputError(f"unknown checkpoint policy {policy!r}", where="policy", fix=f"use one of {list(POLICIES)}")
    parent = _choose_layers(adapted, layers)
    partition_of, layer_of_partition = _partitions(adapted, parent)
    split = split_module(adapted, adapted, lambda node: partition_of[node], keep_original_order=True,
                         keep_original_node_name=True)
    split.graph._codegen = adapted.graph._codegen  # the adapted model's input/output structure (pytree codegen)
    split.recompile()
    names = []
    for number, layer in sorted(layer_of_partition.items()):
        submodule = f"submod_{number}"
        setattr(split, submodule, CheckpointedLayer(getattr(split, submodule), layer, policy))
        names.append(layer)
    view = CheckpointedModel(adapted, split, names, policy)
    changes = [f"{len(names)} layers of {parent!r} run under activation checkpointing (policy {policy!r})"]
    return CheckpointResult(adapted, False, changes, view=view, layers=names)
