"""What every pass shares: a result type and a way to compare graphs node for node."""

from __future__ import annotations

import contextlib
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


def clone_graph_module(gm: fx.GraphModule, class_name: str | None = None, graph: fx.Graph | None = None) -> fx.GraphModule:
    """A new GraphModule over a copy of gm's graph (or over `graph`, a copy already edited: one code generation
    instead of two) with its own module objects over gm's tensors (no weight copies): the two share parameters and
    buffers, never a module, so .train()/.eval() on one leaves the other."""
    new = fx.GraphModule(gm, graph if graph is not None else copy.deepcopy(gm.graph),
                         class_name=class_name or type(gm).__name__)
    own_module_tree(new)
    new.meta = {k: v for k, v in getattr(gm, "meta", {}).items() if k not in ("lora_fx", _PRESERVED)}
    new.training = gm.training
    return new


_PRESERVED = "_user_preserved_attributes"  # gm.meta key whose attributes GraphModule.__deepcopy__ carries over


def own_module_tree(root: torch.nn.Module) -> None:
    """Replace every submodule of `root` by a shallow clone (own parameter/buffer/child dicts, same tensors).

    GraphModule(root, graph) reuses the traced model's leaf module objects, so a mode switch or a module swap on
    the GraphModule would reach the user's model; after this only the tensors are shared."""
    for name, child in list(root._modules.items()):
        if child is None:
            continue
        clone = shallow_clone(child)
        own_module_tree(clone)
        root._modules[name] = clone


def shallow_clone(module: torch.nn.Module, cls: type | None = None) -> torch.nn.Module:
    """The same module over the same tensors (as an instance of `cls`, default its own class), with its own
    attribute, parameter, buffer, child and hook dicts and training flag."""
    clone = object.__new__(cls or type(module))  # not copy.copy: a GraphModule's __reduce__ would recompile it
    clone.__dict__ = dict(module.__dict__)
    for attr in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                 "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                 "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_non_persistent_buffers_set"):
        if attr in clone.__dict__:
            clone.__dict__[attr] = type(module.__dict__[attr])(module.__dict__[attr])
    return clone


def preserve_on_deepcopy(gm: fx.GraphModule, name: str, value: Any) -> None:
    """Set gm.<name> = value so that copy.deepcopy(gm) keeps it (GraphModule.__deepcopy__ rebuilds the module
    and keeps only what gm.meta["_user_preserved_attributes"] lists)."""
    setattr(gm, name, value)
    gm.meta.setdefault(_PRESERVED, {})[name] = value


def dtensor_type() -> type | None:
    """torch.distributed.tensor.DTensor (FSDP2's fully_shard turns parameters into these), or None where this torch
    has no distributed support."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def set_parameter_copy_on_write(root: torch.nn.Module, qualified_name: str, value: torch.Tensor) -> None:
    """Put a new parameter at `qualified_name` under `root` without touching modules that others share.

    Every module on the path is replaced by a shallow clone (own dicts, same other tensors), so the module the
    user gave us, and any other module holding the old parameter, keeps it.
    """
    path, _, leaf = qualified_name.rpartition(".")
    module_copy_on_write(root, path)._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def module_copy_on_write(root: torch.nn.Module, path: str, cloned: set[int] | None = None) -> torch.nn.Module:
    """The module at `path` under `root`, every module on the way there (root excluded) replaced by a shallow clone
    first, so changing it changes no module others share. Modules whose id is in `cloned` are clones already;
    the clones made are added to it."""
    module = root
    for name in path.split(".") if path else []:
        child = module._modules[name]
        if cloned is None or id(child) not in cloned:
            child = module._modules[name] = shallow_clone(child)
            if cloned is not None:
                cloned.add(id(child))
        module = child
    return module


@contextlib.contextmanager
def frozen_norms(model: torch.nn.Module):
    """BatchNorm in eval mode for the duration of a call: the base is frozen, its statistics too."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.training = False
    try:
        yield
    finally:
        for m in norms:
            m.training = True


# ---------------------------------------------------------------------------------------------------- kept calls
class _Ref(str):
    """A node named in a kept call (node.meta survives a graph copy; the node objects it held would not)."""


def keep_call(node: fx.Node, key: str) -> None:
    """Keep `node`'s call (op, target, arguments by node name) in node.meta[key] before a pass rewrites it in place,
    so `restore_calls` can give the traced graph back, in this graph or a copy of it."""
    by_name = fx.node.map_aggregate((node.args, dict(node.kwargs)),
                                    lambda v: _Ref(v.name) if isinstance(v, fx.Node) else v)
    node.meta[key] = (node.op, node.target, *by_name)


def restore_calls(graph: fx.Graph, key: str) -> int:
    """Put back every call kept under `key` (keep_call); returns how many."""
    nodes = {n.name: n for n in graph.nodes}
    restored = 0
    for node in graph.nodes:
        kept = node.meta.pop(key, None)
        if kept is not None:
            op, target, args, kwargs = kept
            args, kwargs = fx.node.map_aggregate((args, kwargs), lambda v: nodes[v] if isinstance(v, _Ref) else v)
            node.op, node.target, node.args, node.kwargs = op, target, tuple(args), dict(kwargs)
            restored += 1
    return restored
