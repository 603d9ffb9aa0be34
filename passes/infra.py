"""What every pass shares: a result type and a way to compare graphs node for node."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx


@dataclass
class PassResult:
    """A pass's output: the (possibly new) GraphModule, whether it changed, and a line per change."""

    graph_module: fx.GraphModule
    modified: bool
    changes: list[str] = field(default_factory=list)


def _describe_target(target: Any) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) and f"{getattr(target, '__module__', '')}.{target.__qualname__}" or str(target)


def _describe_arg(arg: Any) -> Any:
    if isinstance(arg, fx.Node):
        return ("%", arg.name)
    if isinstance(arg, (list, tuple)):
        return type(arg).__name__, tuple(_describe_arg(a) for a in arg)
    if isinstance(arg, dict):
        return tuple(sorted((k, _describe_arg(v)) for k, v in arg.items()))
    if isinstance(arg, slice):
        return ("slice", _describe_arg(arg.start), _describe_arg(arg.stop), _describe_arg(arg.step))
    return repr(arg)


def graph_signature(graph: fx.Graph) -> list[tuple]:
    """One tuple per node: (op, name, target, args, kwargs), with node references by name.

    Two graphs with equal signatures compute the same thing with the same ops on the same attributes.
    """
    return [
        (n.op, n.name, _describe_target(n.target), _describe_arg(n.args), _describe_arg(n.kwargs))
        for n in graph.nodes
    ]


def first_difference(expected: list[tuple], actual: list[tuple]) -> str | None:
    """None when the signatures are equal, else a line naming the first node that differs."""
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e != a:
            return f"node {i}: expected {e[:3]} with args {e[3]}, got {a[:3]} with args {a[3]}"
    if len(expected) != len(actual):
        return f"expected {len(expected)} nodes, got {len(actual)}"
    return None


def clone_graph_module(gm: fx.GraphModule, class_name: str | None = None) -> fx.GraphModule:
    """A new GraphModule over a copy of gm's graph that shares gm's submodules and parameters (no weight copies)."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=class_name or type(gm).__name__)
    new.meta = {k: v for k, v in getattr(gm, "meta", {}).items() if k != "lora_fx"}
    new.train(gm.training)
    return new


def set_parameter_copy_on_write(root: torch.nn.Module, qualified_name: str, value: torch.Tensor) -> None:
    """Put a new parameter at `qualified_name` under `root` without touching modules that others share.

    Every module on the path is replaced by a shallow clone (own dicts, same other tensors), so the module the
    user gave us, and any other module holding the old parameter, keeps it.
    """
    *path, leaf = qualified_name.split(".")
    parent = root
    for name in path:
        child = parent._modules[name]
        clone = copy.copy(child)
        clone._parameters = type(child._parameters)(child._parameters)
        clone._buffers = type(child._buffers)(child._buffers)
        clone._modules = type(child._modules)(child._modules)
        parent._modules[name] = clone
        parent = clone
    parent._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
