"""Capture pass: one call of a model -> a GraphModule that computes that call, flat tensors in and out.

An adapted model is called in many ways (any keyword subset, with or without labels, a KV cache while generating),
and torch.export captures one call signature at a time. `CallSpec` says how a call becomes flat tensors and back:

    model(input_ids=ids, attention_mask=m, cache=DynamicCache, use_cache=True)
        leaves: ids, m, k_0, v_0, k_1, v_1, ...        (the cache's filled layers as key/value pairs)
        constants: use_cache=True                        (baked into the graph; part of the call's key)

`capture_export` exports a small module that takes the leaves, rebuilds the call, runs the model's own forward
(the class the user wrote, over the adapted model's modules) and returns its output flattened the same way; the
spec rebuilds the output (a transformers ModelOutput, a tuple, ...) and writes a returned cache's new tensors into
the caller's own cache object, as the model's own forward would have updated it. No pytree registration of
transformers' caches is needed, and no device or cache constants are baked in.

`call_key` is what a call must share with an earlier one to reuse its graph: per argument, a tensor's rank, dtype
and device (sizes stay dynamic and torch.export guards them), a cache's layout, a constant's value.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)


# ---------------------------------------------------------------------------------------------------- caches
def _dynamic_cache_type() -> type | None:
    try:
        from transformers.cache_utils import DynamicCache
    except Exception:  # transformers is optional
        return None
    return DynamicCache


def is_dynamic_cache(value: Any) -> bool:
    """A transformers DynamicCache made of plain layers (what generate passes): its tensors can be leaves."""
    cache_type = _dynamic_cache_type()
    if cache_type is None or type(value) is not cache_type:
        return False
    return all(type(layer).__name__ == "DynamicLayer" for layer in value.layers)


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """keys_0, values_0, keys_1, ... of the filled layers."""
    out = []
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
            out += [layer.keys, layer.values]
    return out


def fill_cache(cache: Any, tensors: list[torch.Tensor]) -> Any:
    """Set the first len(tensors)/2 layers of `cache` to these keys/values (no update: it would cat onto them)."""
    from transformers.cache_utils import DynamicLayer

    for i in range(len(tensors) // 2):
        while len(cache.layers) <= i:
            cache.layers.append(DynamicLayer())
        layer = cache.layers[i]
        layer.keys, layer.values = tensors[2 * i], tensors[2 * i + 1]
        layer.is_initialized, layer.dtype, layer.device = True, layer.keys.dtype, layer.keys.device
    return cache


# ---------------------------------------------------------------------------------------------------- the spec
def leaf_key(value: Any) -> Any:
    """What a call argument contributes to the call's key; None when it cannot be captured at all."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dim(), value.dtype, value.device.type, value.device.index)
    if isinstance(value, CONSTANTS):
        return ("constant", type(value).__name__, value)
    if is_dynamic_cache(value):
        filled = cache_tensors(value)
        return ("cache", len(filled) // 2, filled[0].dtype if filled else None,
                str(filled[0].device) if filled else None)
    if isinstance(value, (tuple, list, dict)):
        leaves, spec = pytree.tree_flatten(value)
        keys = tuple(leaf_key(v) if isinstance(v, (torch.Tensor, *CONSTANTS)) else None for v in leaves)
        return None if None in keys else ("tree", str(spec), keys)
    return None


def call_key(arguments: dict[str, Any], training: bool) -> tuple | None:
    """The key of a bound call; None when an argument cannot be captured (a StaticCache, an arbitrary object)."""
    parts = [("training", training)]
    for name in sorted(arguments):
        key = leaf_key(arguments[name])
        if key is None:
            return None
        parts.append((name, key))
    return tuple(parts)


@dataclass
class CallSpec:
    """How the calls of one key become leaves (flat tensors) and how the graph's flat outputs become the output."""

    names: tuple[str, ...]  # the arguments, in call order
    kinds: dict[str, tuple]  # name -> ("tensor",) | ("constant", value) | ("cache", n filled) | ("tree", spec, mask)
    output: Any = None  # filled while tracing: (pytree spec of the output with caches as leaves, cache slots)
    extras: dict = field(default_factory=dict)

    @staticmethod
    def of(arguments: dict[str, Any]) -> "CallSpec":
        kinds = {}
        for name, value in arguments.items():
            if isinstance(value, torch.Tensor):
                kinds[name] = ("tensor",)
            elif is_dynamic_cache(value):
                kinds[name] = ("cache", len(cache_tensors(value)) // 2)
            elif isinstance(value, (tuple, list, dict)):
                leaves, spec = pytree.tree_flatten(value)
                mask = tuple(isinstance(v, torch.Tensor) for v in leaves)
                kinds[name] = ("tree", spec, mask, tuple(None if m else v for v, m in zip(leaves, mask)))
            else:
                kinds[name] = ("constant", value)
        return CallSpec(tuple(arguments), kinds)

    def leaves(self, arguments: dict[str, Any]) -> list[torch.Tensor]:
        out = []
        for name in self.names:
            kind, value = self.kinds[name], arguments[name]
            if kind[0] == "tensor":
                out.append(value)
            elif kind[0] == "cache":
                out += cache_tensors(value)
            elif kind[0] == "tree":
                out += [v for v, m in zip(pytree.tree_leaves(value), kind[2]) if m]
        return out

    def arguments(self, leaves: list[torch.Tensor]) -> dict[str, Any]:
        """The call rebuilt from its leaves (inside the traced function)."""
        leaves, out = list(leaves), {}
        for name in self.names:
            kind = self.kinds[name]
            if kind[0] == "tensor":
                out[name] = leaves.pop(0)
            elif kind[0] == "constant":
                out[name] = kind[1]
            elif kind[0] == "cache":
                out[name] = fill_cache(_dynamic_cache_type()(), [leaves.pop(0) for _ in range(2 * kind[1])])
            else:
                values = [leaves.pop(0) if m else c for m, c in zip(kind[2], kind[3])]
                out[name] = pytree.tree_unflatten(values, kind[1])
        return out

    def flat_output(self, output: Any) -> tuple[torch.Tensor, ...]:
        """The output's tensors (a cache's keys/values in its place); records the structure (on this plain object:
        torch.export restores module attributes after tracing)."""
        leaves, spec = pytree.tree_flatten(output, is_leaf=is_dynamic_cache)
        flat, slots = [], []
        for v in leaves:
            if is_dynamic_cache(v):
                tensors = cache_tensors(v)
                slots.append(("cache", len(tensors)))
                flat += tensors
            elif isinstance(v, torch.Tensor):
                slots.append(("tensor", 1))
                flat.append(v)
            else:
                slots.append(("constant", v))
        self.output = (spec, slots)
        return tuple(flat)

    def rebuild_output(self, flat: tuple, arguments: dict[str, Any]) -> Any:
        """The model's output from the graph's flat outputs; a cache goes into the caller's own cache object."""
        spec, slots = self.output
        flat, values = list(flat), []
        given = [arguments[n] for n in self.names if self.kinds[n][0] == "cache"]
        for kind, n in slots:
            if kind == "tensor":
                values.append(flat.pop(0))
            elif kind == "constant":
                values.append(n)
            else:
                cache = given[0] if given else _dynamic_cache_type()()
                values.append(fill_cache(cache, [flat.pop(0) for _ in range(n)]))
        return pytree.tree_unflatten(values, spec)


# ---------------------------------------------------------------------------------------------------- capture
class _FlatCall(nn.Module):
    """Exported in place of the model: the same modules and tensors under the same names, leaves in and out."""

    def __init__(self, core: nn.Module, spec: CallSpec):
        super().__init__()
        for attr in ("_parameters", "_buffers", "_modules"):
            self.__dict__[attr] = core.__dict__[attr]
        object.__setattr__(self, "_core", core)
        object.__setattr__(self, "_spec", spec)

    def forward(self, *leaves):
        arguments = self._spec.arguments(list(leaves))
        return self._spec.flat_output(type(self._core).forward(self._core, **arguments))


def capture_export(core: nn.Module, arguments: dict[str, Any], export) -> tuple[fx.GraphModule, CallSpec]:
    """(GraphModule of the call, its CallSpec). `export(module, leaves)` runs torch.export the way the trace pass
    does (dynamic sizes, size-oblivious for size-1 examples); `core` runs the user's forward."""
    spec = CallSpec.of(arguments)
    flat = _FlatCall(core, spec)
    program = export(flat, tuple(spec.leaves(arguments)))
    return program, spec


def bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call as {parameter name: value}, **kwargs merged in, in the forward's order (defaults left out)."""
    bound = signature.bind(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"*{name} arguments cannot be captured by name")
        else:
            out[name] = value
    return out
