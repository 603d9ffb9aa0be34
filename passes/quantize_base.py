"""Quantize-base pass: route every read of a quantized frozen weight through its quantized matmul.

    y = linear(x, W0, b)                          w = get_attr W0          (NF4: the NF4 codes; FP8: W0 itself)
    (or call_module nn.Linear(x),     becomes     b = get_attr b
     or x @ W0.T: Falcon's layers)                y = lora_fx_base.<key>(x, w, b)   # NF4 dequant-matmul, or FP8

    y = addmm(b, x, W0)  (GPT-2's Conv1D)  becomes  y = lora_fx_base.<key>(b, x, W0, form="addmm")
    y = x @ W0                             becomes  y = lora_fx_base.<key>(x, W0, form="matmul")
    (W0 stored (in, out): the call keeps its arguments where they were, so Site.input_arg still finds x)

The rewritten node keeps its name, and its original call is kept in node.meta, so LoRA branches placed beside it
(inject) stay where they were and `restore` gives back the graph as traced (fold checks that node for node).
Only whole-weight linear calls (of an (out, in) weight, or the (in, out) forms above) can be rewritten;
lora_fx.quantize picks weights whose every site is one, and a graph captured later that reads a quantized weight any
other way is refused here. For x @ W0.T
the transpose node is kept too, as a call that reads nothing (`unread`), and restored with the matmul.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from lora_fx.errors import InputError
from lora_fx.passes.infra import PassResult, keep_call, restore_calls
from lora_fx.passes.match import _positional
from lora_fx.site import IN_OUT, OUT_IN, Site

CONTAINER = "lora_fx_base"  # the ModuleDict of the quantized matmuls, child of the adapted model and its graphs
TAG, ATTR = "lora_fx_base", "lora_fx_base_attr"  # node.meta keys: the original call; get_attr nodes this pass added


def why_not_rewritable(site: Site) -> str | None:
    """None when the site is a whole-weight linear call the quantized matmuls can run; else why not."""
    if call_form(site) is None:
        if site.op not in ("linear_module", "functional_linear", "matmul", "conv1d"):
            return f"read by a {site.op} call (only linear calls, x @ W.T and x @ W run on quantized weights)"
        return "read in another layout, by row slices or with x passed by keyword"
    if site.other_readers:
        return f"also read by {list(site.other_readers)[:3]}"
    return None


def call_form(site: Site) -> str | None:
    """How the quantized matmul is called in place of the site's call (None: it cannot be):
    "linear" (x, W, b) for linear calls and x @ W.T of an (out, in) weight; "addmm" (b, x, W) and "matmul" (x, W)
    for calls of a weight stored (in, out)."""
    if site.weight_rows is not None:
        return None
    if site.weight_layout == OUT_IN:
        return "linear" if site.op in ("linear_module", "functional_linear") or _is_transposed_matmul(site) else None
    if site.weight_layout == IN_OUT and site.op in ("matmul", "conv1d"):
        if site.input_arg == 1 and site.has_bias:
            return "addmm"
        if site.input_arg == 0 and not site.has_bias:
            return "matmul"
    return None


def operands(args: tuple, form: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, weight, bias) of a rewritten call's arguments, by its form (call_form)."""
    if form == "addmm":
        bias, x, weight = args
        return x, weight, bias
    if form == "matmul":
        x, weight = args
        return x, weight, None
    x, weight, *rest = args
    return x, weight, rest[0] if rest else None


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
        form = call_form(site)
        if form != "linear":  # a weight stored (in, out): the arguments stay where they were
            args, names = _positional(node, "matmul")
            count = 3 if form == "addmm" else 2
            node.op, node.target = "call_module", f"{CONTAINER}.{keys[site.weight]}"
            node.args = tuple(args[:count])
            node.kwargs = {**{k: v for k, v in node.kwargs.items() if k not in names}, "form": form}
            changes.append(f"{site.node}: {site.weight} -> {node.target} ({form})")
            continue
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
