"""Layer split pass: a training view of an adapted graph with one submodule per repeated layer.

Why: a flat FX graph is one function, so two things users of big models need have nowhere to attach:
  * activation checkpointing: with the base frozen, a LoRA step's memory is mostly activations; a layer run under
    torch.utils.checkpoint keeps only its inputs and recomputes the rest in the backward pass.
  * FSDP2 per layer: fully_shard(module) gathers a module's weights in a hook on its forward, but a torch.export
    graph reads every weight at the top (get_attr) and calls no layer module, so only the whole model could be one
    FSDP unit, gathered whole on every GPU.

How: every node knows the module it came from (`nn_module_stack`, kept by both front ends and copied by inject onto
the LoRA nodes). Consecutive nodes of one item of the model's layer list (`model.layers.3`) form one part, the nodes
between layers parts of their own; parts follow graph order, so each depends only on earlier ones. Each part becomes
a GraphModule that reads its own weights: it holds the adapted model's module objects that own them (the same
objects, not copies), so fully_shard(part) shards exactly that layer's weights, A and B included, and the adapted
model sees the sharded tensors too. The top graph calls the parts in order, with the adapted graph's signature.

Measured on an H200 (1.1B Llama, LoRA on q,v, docs/benchmarks.md): checkpointing every layer, 0.34 of the plain
LoRA step's peak memory for 1.34x its step time; every other layer, 0.67 for 1.18x. Selective checkpointing (keep
matmul outputs, recompute elementwise ops) was tried and dropped: its per-op dispatch made the step 2.2x slower and
it kept 0.82 of the memory.

The view shares every parameter and module with the adapted model and changes nothing of it: train the view; fold,
save and export the adapted model as before.
"""

from __future__ import annotations

import operator
import re

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from lora_fx.errors import InputError
from lora_fx.passes.capture import bind
from lora_fx.passes.infra import PassResult, frozen_norms

_LAYER = re.compile(r"^(?P<parent>.+)\.(?P<index>\d+)$")


# ------------------------------------------------------------------------------------------------ finding layers
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
        raise InputError("found no repeated layers to split at (no module list with 2 or more items in the graph)",
                         where=type(gm).__name__,
                         fix="the split follows a list of layers (nn.ModuleList, nn.Sequential); train this model "
                             "without it")
    # the list with the most items; among equals the outermost (shortest path)
    return min(repeated, key=lambda p: (-repeated[p], p.count(".")))


def _runs(gm: fx.GraphModule, parent: str) -> list[tuple[str | None, list[fx.Node]]]:
    """The graph's computing nodes cut into runs of consecutive nodes of one layer (name) or of none (None).
    A node without module information (inserted by a pass) stays in the run it sits in."""
    runs: list[tuple[str | None, list[fx.Node]]] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        paths = _module_paths(node)
        key = next((p for p in paths if (m := _LAYER.match(p)) and m["parent"] == parent), None)
        if not paths and runs:
            key = runs[-1][0]
        if not runs or runs[-1][0] != key:
            runs.append((key, []))
        runs[-1][1].append(node)
    return runs


# ------------------------------------------------------------------------------------------------ building parts
def _alias(path: str) -> str:
    return "m_" + path.replace(".", "_")


def _attach(holder: nn.Module, owners: dict[str, nn.Module], gm: fx.GraphModule, target: str) -> str:
    """Make `target` (a get_attr of the adapted graph) readable from a module built over `holder`; returns the
    target to read it by. Through the adapted model's module that owns it (the same object) when there is one."""
    owner_path, _, attr = target.rpartition(".")
    if owner_path:
        owners[_alias(owner_path)] = gm.get_submodule(owner_path)
        return f"{_alias(owner_path)}.{attr}"
    value, alias = getattr(gm, attr), "a_" + attr  # an attribute of the adapted model itself
    if isinstance(value, nn.Module):
        holder.add_module(alias, value)
    elif isinstance(value, nn.Parameter):
        holder.register_parameter(alias, value)
    elif isinstance(value, torch.Tensor):
        holder.register_buffer(alias, value)
    else:
        setattr(holder, alias, value)
    return alias


def _graph_module(holder: nn.Module, owners: dict[str, nn.Module], graph: fx.Graph, name: str) -> fx.GraphModule:
    for alias, owner in owners.items():
        holder.add_module(alias, owner)
    module = fx.GraphModule(holder, graph, class_name=name)
    for alias, owner in owners.items():  # GraphModule builds fresh modules along get_attr paths: put ours back
        module._modules[alias] = owner
    return module


def _part(gm: fx.GraphModule, nodes: list[fx.Node], exports: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node]]:
    """One run as a GraphModule: takes the outer values it reads (returned in order), reads its weights itself
    through the adapted model's own module objects, and returns `exports` as a tuple."""
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes
                                if a not in inside and a.op != "get_attr"))
    graph, env, holder, owners = fx.Graph(), {}, nn.Module(), {}
    for outer in inputs:
        env[outer] = graph.placeholder(outer.name)
        env[outer].meta = dict(outer.meta)
    for node in nodes:
        for a in node.all_input_nodes:
            if a.op == "get_attr" and a not in env:  # a weight: read inside this part
                env[a] = graph.get_attr(_attach(holder, owners, gm, a.target))
                env[a].meta = dict(a.meta)
        copy = graph.node_copy(node, lambda a: env[a])
        if node.op == "call_module":  # the same module object, under a local name
            owners[_alias(node.target)] = gm.get_submodule(node.target)
            copy.target = _alias(node.target)
        env[node] = copy
    graph.output(tuple(env[n] for n in exports))
    return _graph_module(holder, owners, graph, "Part"), inputs


class CheckpointedLayer(nn.Module):
    """A part run under torch.utils.checkpoint (non-reentrant: RNG state and autocast are replayed, so dropout
    masks match) when gradients are on."""

    def __init__(self, part: fx.GraphModule):
        super().__init__()
        self.part = part

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.part(*args)
        return checkpoint(self._run, *args, use_reentrant=False)

    def _run(self, *args):
        with frozen_norms(self.part):  # the recompute in the backward pass too: statistics stay frozen
            return self.part(*args)


class LayerView(nn.Module):
    """Training view of an adapted model: the same computation and parameters, one submodule per layer.

    .adapted is the model it views (not a child: its tensors are reachable through the parts already).
    .layer_modules: layer name -> the part(s) computing it (shard these with fully_shard for per-layer FSDP2).
    .checkpointed: the layers that run under activation checkpointing.
    .train()/.eval() go to the adapted model. A view made by lora_fx.split_layers runs calls of another kind
    (other arguments, e.g. labels; the other mode) through a view of the adapted model's graph for that call."""

    def __init__(self, adapted: fx.GraphModule, top: fx.GraphModule, layer_modules: dict[str, list[nn.Module]],
                 checkpointed: list[str]):
        super().__init__()
        self.top = top
        self.__dict__["adapted"] = adapted
        self.layer_modules, self.checkpointed = layer_modules, checkpointed
        self.layers = list(layer_modules)
        self.training = adapted.training

    def forward(self, *args, **kwargs):
        route = self.__dict__.get("route")  # lora_fx.api: a call of another kind goes to a view of its own graph
        other = route(self, args, kwargs) if route is not None else None
        if other is not None:
            return other()
        call = self.__dict__.get("call")  # (spec, signature) of an adapted model's torch.export graph
        with frozen_norms(self.top):  # the base's BatchNorm statistics stay as they are (lora_fx.adapted)
            if call is None:
                return self.top(*args, **kwargs)
            spec, signature = call
            arguments = bind(signature, args, kwargs)
            return spec.rebuild_output(self.top(*spec.leaves(arguments)), arguments)

    def train(self, mode: bool = True) -> "LayerView":
        self.adapted.train(mode)
        self.training = mode
        route = self.__dict__.get("route")
        if route is not None:
            route.prepare()
        return self


def split_layers(adapted: fx.GraphModule, checkpoint_every: int = 0, layers: str | None = None) -> PassResult:
    """Build the layer view of `adapted` (which is left as it was): the result's graph_module is the LayerView.
    checkpoint_every=k runs every k-th layer under activation checkpointing (0: none)."""
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise InputError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}", where="checkpoint_every",
                         fix="0 checkpoints no layer, 1 each layer, 2 every other one")
    parent = _choose_layers(adapted, layers)
    runs = _runs(adapted, parent)
    run_of = {node: i for i, (_, nodes) in enumerate(runs) for node in nodes}
    names = list(dict.fromkeys(name for name, _ in runs if name is not None))
    checkpointed = names[::checkpoint_every] if checkpoint_every else []

    top, env, holder, owners = fx.Graph(), {}, nn.Module(), {}
    layer_modules: dict[str, list[nn.Module]] = {name: [] for name in names}
    for node in adapted.graph.nodes:
        if node.op == "placeholder":
            env[node] = top.node_copy(node, lambda a: env[a])
    for i, (name, nodes) in enumerate(runs):
        exports = [n for n in nodes if any(run_of.get(u) != i for u in n.users)]  # used later, or by the output
        part, inputs = _part(adapted, nodes, exports)
        if name is not None:
            layer_modules[name].append(part)
        module = CheckpointedLayer(part) if name in checkpointed else part
        holder.add_module(f"part_{i}", module)
        call = top.call_module(f"part_{i}", tuple(env[a] for a in inputs))
        for k, n in enumerate(exports):
            env[n] = top.call_function(operator.getitem, (call, k))
    output = next(n for n in adapted.graph.nodes if n.op == "output")
    for a in output.all_input_nodes:
        if a.op == "get_attr":  # the model returns a weight as it is
            env[a] = top.get_attr(_attach(holder, owners, adapted, a.target))
    top.node_copy(output, lambda a: env[a])
    top._codegen = adapted.graph._codegen  # the adapted model's input/output structure (pytree codegen)
    top_module = _graph_module(holder, owners, top, type(adapted).__name__ + "Layers")
    view = LayerView(adapted, top_module, layer_modules, checkpointed)
    changes = [f"split at the {len(names)} layers of {parent!r}; {len(checkpointed)} run under activation "
               f"checkpointing"]
    return PassResult(view, True, changes)

