"""The names an ONNX export carries: its dynamic axes and its outputs.

Deployment code looks tensors up by name: ONNX Runtime clients feed `input_ids` and read `logits`, and size their
buffers from dims named `batch` and `sequence`. The dynamo exporter names outputs after FX nodes (`linear_14`,
and `add_947` in an unmerged export) and, depending on the torch version, dynamic dims after its own symbols
(`s72`, with another symbol for each input's batch). So every export goes through here:

* ``dynamic_specs``: for ``export_onnx(dynamic=True)``, dim 0 of every tensor input is ``batch`` and dim 1 of token
  ids, masks and (batch, sequence, features) inputs is ``sequence``; every other dim stays static. A model that pins
  one of those dims (a ViT's patch count) is exported with fewer dynamic dims, most dynamic first.
* ``output_names``: the model's own output fields (``logits``, ``last_hidden_state``, ``pooler_output``, nested
  ones as ``hidden_states.0``), ``output`` for a bare tensor and ``output_0``, ... for tuples.
* ``name_interface``: renames the exported graph's symbols and outputs to those names, in every value's shape, so
  base and merged exports of one model are named alike and ``verify_onnx`` still compares them as identical.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
import torch.utils._pytree as pytree

from lora_fx.errors import InputError

BATCH, SEQUENCE = "batch", "sequence"


def dynamic_specs(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """dynamic_shapes for export_onnx(dynamic=True), most dynamic first: dim 0 of every tensor input named batch
    and dim 1 of every 2-D or 3-D one named sequence; then batch alone as Dim.AUTO (an input whose dim 0 is no
    batch). Dims the model pins (an MLP's features, a ViT's channels) come out of the first with
    `without_pinned`. Every other dim is static, so the file says which sizes it takes. Keyed by forward-parameter
    name, the one form torch.export accepts for positional and keyword inputs. Nested inputs stay static."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as err:
        raise InputError(f"the example inputs do not match the forward signature: {err}",
                         where=f"{type(model).__name__}.forward",
                         fix="pass the example inputs the forward expects, or give dynamic_shapes yourself") from err
    params = inspect.signature(model.forward).parameters

    def spec(batch: Any, sequence: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if params[name].kind is inspect.Parameter.VAR_POSITIONAL:
                out[name] = tuple(pytree.tree_map(lambda _: None, v) for v in value)
            elif params[name].kind is inspect.Parameter.VAR_KEYWORD:
                out[name] = {k: pytree.tree_map(lambda _: None, v) for k, v in value.items()}
            elif isinstance(value, torch.Tensor) and value.dim() > 0:
                axes = {0: batch, **({1: SEQUENCE} if sequence and value.dim() in (2, 3) else {})}
                out[name] = axes
            else:
                out[name] = pytree.tree_map(lambda _: None, value)
        return out

    return [spec(BATCH, True), spec(torch.export.Dim.AUTO, False)]


_PINNED = re.compile(r"static shape of \d+ for dimension inputs\['([^']+)'\]\.shape\[(\d+)\]")


def without_pinned(spec: dict[str, Any], error: str) -> dict[str, Any] | None:
    """`spec` without the dims that torch.export's error says the model pins to one size, or None if it names none
    of them ("tracing inferred a static shape of 3 for dimension inputs['pixel_values'].shape[1]")."""
    pinned = {(name, int(axis)) for name, axis in _PINNED.findall(error)}
    out = {name: {a: d for a, d in axes.items() if (name, a) not in pinned} or None
           if isinstance(axes, dict) and all(isinstance(a, int) for a in axes) else axes
           for name, axes in spec.items()}
    return out if out != spec else None


def axis_names(dynamic_shapes: Any) -> dict[str, dict[int, str]]:
    """{input name: {axis: name}} for the axes that dynamic_shapes names with strings ({"input_ids": {0: "batch"}});
    the Dim.AUTO batch of the last fallback is still called batch."""
    if not isinstance(dynamic_shapes, dict):
        return {}
    out = {}
    for name, axes in dynamic_shapes.items():
        if isinstance(axes, dict) and all(isinstance(a, int) for a in axes):
            named = {a: d if isinstance(d, str) else BATCH for a, d in axes.items()
                     if isinstance(d, str) or (a == 0 and d is torch.export.Dim.AUTO)}
            if named:
                out[name] = named
    return out


def _key(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def output_names(outputs: Any) -> list[str]:
    """One name per tensor the model returns, in the exporter's (pytree) order."""
    leaves = [(path, v) for path, v in pytree.tree_flatten_with_path(outputs)[0] if isinstance(v, torch.Tensor)]
    names = []
    for path, _ in leaves:
        parts = [_key(p) for p in path]
        if not parts:
            names.append("output")
        elif isinstance(path[0], pytree.SequenceKey):
            names.append("_".join(["output", *parts]) if len(parts) > 1 else f"output_{parts[0]}")
        else:
            names.append(".".join(parts))
    return names if len(set(names)) == len(names) else []


def name_interface(model: Any, axis_names: dict[str, dict[int, str]], outputs: list[str]) -> None:
    """Rename the exported graph's dynamic dims and outputs (an onnx_ir Model, in place)."""
    import onnx_ir as ir

    graph = model.graph
    symbols: dict[str, str] = {}
    for value in graph.inputs:
        for axis, wanted in axis_names.get(value.name, {}).items():
            dims = value.shape.dims if value.shape is not None else ()
            if axis < len(dims) and isinstance(dims[axis], ir.SymbolicDim) and dims[axis].value is not None:
                symbol = str(dims[axis].value)
                if symbol not in symbols and wanted == SEQUENCE and wanted in symbols.values():
                    # dynamic=True's own name for dim 1, where torch.export tells this size apart from the one that
                    # has the name (an encoder-decoder's two sequences): ONNX Runtime reads equal names as equal
                    # sizes, so this one is named after its input. Names given on purpose (the KV cache's
                    # past_sequence of every layer, batch) are kept as given
                    wanted = f"{value.name}_{wanted}"
                symbols.setdefault(symbol, wanted)
    if symbols:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(symbols, key=len, reverse=True))) + r")\b")
        rename = lambda text: pattern.sub(lambda m: symbols[m.group(1)], text)
        for value in _values(graph):
            if value.shape is None or not any(isinstance(d, ir.SymbolicDim) for d in value.shape.dims):
                continue
            value.shape = ir.Shape([ir.SymbolicDim(rename(str(d.value))) if isinstance(d, ir.SymbolicDim)
                                    and d.value is not None else d for d in value.shape.dims])
    _name_outputs(graph, outputs)


def _values(graph: Any):
    import onnx_ir as ir

    yield from graph.inputs
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


def _name_outputs(graph: Any, names: list[str]) -> None:
    """graph.outputs[i] gets names[i]; a value that is also an input, or listed twice, keeps its name. Another value
    already holding a wanted name is renamed out of the way."""
    outputs = list(graph.outputs)
    if len(names) != len(outputs):
        return
    keep = {id(v) for v in graph.inputs} | {id(v) for v in outputs if sum(o is v for o in outputs) > 1}
    taken = {v.name: v for v in _values(graph) if v.name}
    for value, name in zip(outputs, names):
        if id(value) in keep or value.name == name:
            continue
        other = taken.get(name)
        if other is not None and other is not value:
            other.name = f"{name}__{len(taken)}"
            taken[other.name] = other
        value.name = name
        taken[name] = value
