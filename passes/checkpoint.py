"""Checkpoint pass: a training view of an adapted graph that runs each repeated layer under activation checkpointing.

Why: with the base frozen, a LoRA step's memory is mostly activations (the optimizer holds only A and B). Keeping
fewer of them and recomputing the rest in the backward pass is how LoRA fits in half of full fine-tuning's memory.

How: every node of the adapted graph knows the module it came from (`nn_module_stack`, kept by both front ends and
by inject). Nodes of one item of the model's layer list (`model.layers.3`) form one partition; torch.fx's
`split_module` turns each into a submodule, called under torch.utils.checkpoint (non-reentrant, so RNG state, autocast
and dropout masks are replayed exactly). A checkpointed layer keeps only its inputs and runs its forward again in the
backward pass. every=k checkpoints every k-th layer: memory and extra compute both scale with the layers chosen.

Measured on an H200 (1.1B Llama, docs/benchmarks.md): every layer, 0.34 of the plain LoRA step's peak memory for
1.35x its step time. Selective checkpointing (keep matmul outputs, recompute elementwise ops) was tried and dropped:
its per-op dispatch made the step 2.2x slower and it kept 0.82 of the memory.

The view shares every parameter and LoRA module with the adapted model; nothing of the adapted model changes.
Train the view; fold, save and export the adapted model as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from lora_fx.errors import InputError
from lora_fx.passes.infra import PassResult

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

    def __init__(self, layer: fx.GraphModule, name: str):
        super().__init__()
        self.layer, self.name = layer, name

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.layer(*args)
        return checkpoint(self.layer, *args, use_reentrant=False)


class CheckpointedModel(nn.Module):
    """Training view of an adapted model: the same computation and parameters, layers under checkpointing.

    .adapted is the model it views (not a child module: its tensors are reachable through .split already).
    .train()/.eval() go to the adapted model, which switches only its LoRA branches."""

    def __init__(self, adapted: fx.GraphModule, split: fx.GraphModule, layers: list[str]):
        super().__init__()
        self.split = split
        self.__dict__["adapted"] = adapted
        self.layers = layers
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


def checkpoint_layers(adapted: fx.GraphModule, every: int = 1, layers: str | None = None) -> CheckpointResult:
    """Build the checkpointed training view of `adapted` (which is left as it was): every `every`-th layer of the
    module list `layers` (default: the one with the most items) runs under activation checkpointing."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise InputError(f"every must be a positive int, got {every!r}", where="every",
                         fix="every=1 checkpoints each layer, every=2 every other one")
    parent = _choose_layers(adapted, layers)
    partition_of, layer_of_partition = _partitions(adapted, parent)
    split = split_module(adapted, adapted, lambda node: partition_of[node], keep_original_order=True,
                         keep_original_node_name=True)
    split.graph._codegen = adapted.graph._codegen  # the adapted model's input/output structure (pytree codegen)
    split.recompile()
    in_order = list(dict.fromkeys(layer_of_partition[n] for n in sorted(layer_of_partition)))
    names = in_order[::every]
    for number, layer in layer_of_partition.items():
        if layer in names:  # a layer whose nodes another run interrupts has several partitions: each is wrapped
            submodule = f"submod_{number}"
            setattr(split, submodule, CheckpointedLayer(getattr(split, submodule), layer))
    view = CheckpointedModel(adapted, split, names)
    changes = [f"{len(names)} of {len(in_order)} layers of {parent!r} run under activation checkpointing"]
    return CheckpointResult(adapted, False, changes, view=view, layers=names)
