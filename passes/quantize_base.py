"""Quantize-base pass: route every read of a quantized frozen weight through its quantized matmul.

    y = linear(x, W0, b)                          w = get_attr W0          (NF4: the NF4 codes; FP8: W0 itself)
    (or call_module nn.Linear(x),     becomes     b = get_attr b
     or x @ W0.T: Falcon's layers)                y = lora_fx_base.<key>(x, w, b)   # NF4 dequant-matmul, or FP8

The rewritten node keeps its name, and its original call is kept in node.meta, so LoRA branches placed beside it
(inject) stay where they were and `restore` gives back the graph as traced (fold checks that node for node).
Only whole-weight linear calls of an (out, in) weight can be rewritten; lora_fx.quantize picks weights whose every
site is one, and a graph captured later that reads a quantized weight any other way is refused here. For x @ W0.T
the transpose node is kept too, as a call that reads nothing (`unread`), and restored with the matmul.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from lora_fx.errors import InputError
from lora_fx.passes.infra import PassResult, keep_call, restore_calls
from lora_fx.passes.match import _positional
from lora_fx.site import OUT_IN, Site

CONTAINER = "lora_fx_base"  # the ModuleDict of the quantized matmuls, child of the adapted model and its graphs
TAG, ATTR = "lora_fx_base", "lora_fx_base_attr"  # node.meta keys: the original call; get_attr nodes this pass added


def why_not_rewritable(site: Site) -> str | None:
    """None when the site is a whole-weight linear call of an (out, in) weight; else why it cannot be rewritten."""
    if site.op not in ("linear_module", "functional_linear") and not _is_transposed_matmul(site):
        return f"read by a {site.op} call (only linear calls and x @ W.T run on quantized weights)"
    if site.weight_layout != OUT_IN or site.weight_rows is not None:
        return "read in another layout or by row slices"
    if site.other_readers:
        return f"also read by {list(site.other_readers)[:3]}"
    return None


def _is_transposed_matmul(site: Site) -> bool:
    """x @ W.T (matmul / mm on the transpose of a whole (out, in) weight, x first, no bias): linear(x, W)."""
    return site.op == "matmul" and site.weight_layout == OUT_IN and site.input_arg == 0 and not site.has_bias


def unread(weight: torch.Tensor) -> None:
    """What the transpose node of a rewritten x @ W.T calls: nothing (an NF4 weight has no transpose to make)."""
    return None


def _call_parts(gm: fx.GraphModule, node: fx.Node, site: Site) -> tuple[object, fx.Node, object]:
    """(x, weight node, bias node or None) of a linear site, adding get_attr nodes for a module call's tensors.
    For x @ W.T the transpose node is kept (restore puts it back) and made to read nothing."""
    if node.op == "call_module":
        module: nn.Module = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        for added in (weight, bias):
            if added is not None:
                added.meta[ATTR] = True
        return node.args[0], weight, bias
    if site.op == "matmul":
        transpose = _positional(node, "matmul")[0][1]
        weight = transpose.args[0]
        if TAG not in transpose.meta:  # two matmuls may share one W.T
            keep_call(transpose, TAG)
            transpose.op, transpose.target, transpose.args, transpose.kwargs = "call_function", unread, (weight,), {}
        return node.args[0], weight, None
    args, _ = _positional(node, "functional_linear")
    return args[0], args[1], args[2] if len(args) > 2 else None


def rewrite(gm: fx.GraphModule, sites: list[Site], keys: dict[str, str], container: nn.ModuleDict) -> PassResult:
    """Rewrite the sites of the weights in `keys` ({weight name: key in container}) to their quantized matmuls."""
    gm.add_module(CONTAINER, container)
    nodes = {n.name: n for n in gm.graph.nodes}
    changes = []
    for site in sites:
        if site.weight not in keys:
            continue
        reason = why_not_rewritable(site)
        if reason is not None:
            raise InputError(f"this call reads the quantized weight {site.weight!r} at {site.node}: {reason}",
                             where=site.name, fix="quantize_base(..., which=) without this weight, or call the "
                                                  "model as it was when quantize_base ran")
        node = nodes[site.node]
        if TAG in node.meta:
            continue
        keep_call(node, TAG)
        x, weight, bias = _call_parts(gm, node, site)
        node.op, node.target = "call_module", f"{CONTAINER}.{keys[site.weight]}"
        if isinstance(site.input_arg, str):  # x came by keyword: keep it so (inject finds x by Site.input_arg)
            node.args, node.kwargs = (), {site.input_arg: x, "weight": weight, "bias": bias}
        else:
            node.args, node.kwargs = (x, weight, bias), {}
        changes.append(f"{site.node}: {site.weight} -> {node.target}")
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(changes), changes)


def restore(graph: fx.Graph) -> int:
    """Undo `rewrite` on a graph (a copy fold checks): each call back as traced, the added get_attr nodes gone."""
    restored = restore_calls(graph, TAG)
    for node in reversed(list(graph.nodes)):
        if node.meta.get(ATTR) and not node.users:
            graph.erase_node(node)
    return restored
