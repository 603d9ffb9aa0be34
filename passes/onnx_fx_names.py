"""Names an ONNX export derives from FX nodes, repaired after LoRA nodes are removed from the graph.

The torch exporter names some constants after the FX node that made them (``scalar_tensor_default_K``), numbered
over the whole FX graph; an unmerged adapted model's FX graph has LoRA nodes the base model's never had, so after
the ONNX fold those numbers must shift back for ``verify_onnx`` (which compares such initializers by name) to see
the base export.
"""

from __future__ import annotations

import re

from onnxscript import ir

from lora_fx.passes.onnx_fold_rule import _FX_NODE_KEY

_FX_NAME = re.compile(r"(?P<base>[A-Za-z_][A-Za-z0-9_]*?)(?:_(?P<n>\d+))?")
_FX_REF = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)")


def fx_references(model: ir.Model) -> set[str]:
    """Names of the FX nodes that the nodes of `model` read, from the FX node the torch exporter recorded on each
    ONNX node (``%mul : ... = call_function[...](args = (%linear_2, %scalar_tensor_default_1), ...)``)."""
    names: set[str] = set()
    for node in model.graph:
        text = node.metadata_props.get(_FX_NODE_KEY, "")
        if " = " in text:
            names.update(_FX_REF.findall(text.split(" = ", 1)[1]))
    return names


def renumber_fx_names(model: ir.Model, gone: set[str]) -> dict[str, str]:
    """Renumber the initializers named after FX nodes as if the FX nodes in `gone` had never existed.

    Some exported constants are named after the FX node that made them (``scalar_tensor_default``,
    ``scalar_tensor_default_1``, ...: fp16 exports name LoRA's scaling that way), numbered per base name in creation
    order over the whole FX graph, constants the exporter later merged or dropped included. The base model's FX
    graph never had the LoRA nodes, so each remaining member of such a family is numbered lower there by the count
    of LoRA members before it; verify_onnx compares these initializers by name. `gone`: the FX names that only the
    removed LoRA nodes read (taken from the exporter's metadata, which still names constants that were merged into
    another initializer). ``val_N`` names are the exporter's own and compared anonymously: left alone.
    Returns {old name: new name}.
    """
    lora_numbers: dict[str, list[int]] = {}
    for name in gone:
        m = _FX_NAME.fullmatch(name)
        if m and m["base"] != "val":
            lora_numbers.setdefault(m["base"], []).append(int(m["n"] or 0))
    members: dict[str, list[tuple[int, str]]] = {}
    for name in model.graph.initializers:
        m = _FX_NAME.fullmatch(name)
        if m and m["base"] in lora_numbers:
            members.setdefault(m["base"], []).append((int(m["n"] or 0), name))
    taken = {v.name for node in model.graph for v in node.outputs} | {v.name for v in model.graph.inputs}
    renames: dict[str, str] = {}
    for base, family in members.items():
        for n, name in sorted(family):  # ascending: each target name is free when reached
            shift = sum(1 for k in lora_numbers[base] if k < n)
            if shift == 0:
                continue
            new = base if n - shift == 0 else f"{base}_{n - shift}"
            if new in model.graph.initializers or new in taken:
                break  # not the numbering this function assumes: leave the rest as they are
            value = model.graph.initializers.pop(name)
            value.name = new
            model.graph.initializers[new] = value
            if value.const_value is not None:
                value.const_value.name = new
            renames[name] = new
    return renames
