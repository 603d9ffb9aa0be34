"""Match pass, expert weights: a 3-D parameter (num_experts, d1, d2) whose slices are the weights of a
mixture-of-experts layer's experts, wherever the graph consumes it.

Three forms, one site kind ("experts", lora_fx.site_kinds); Site.params["form"] says which the branch must follow:

    grouped  y = grouped_mm(x, W, offs)         rows of x sorted by expert, offs = cumulative row counts:
                                                transformers' `transformers::grouped_mm_fallback` custom op and
                                                `aten._grouped_mm` (torch.export graphs of HF MoE models with
                                                experts_implementation="grouped_mm"), torch._grouped_mm / F.grouped_mm
    x_first  y = linear(x, W[i]) | x @ W[i]     one expert's slice (a symbolic trace of a loop over experts:
                 | bmm(x, W[ids])               W[e] with e an int or a scalar node), or one slice per row
    w_first  y = bmm(W[ids], x)                 (transformers' experts_implementation="batched_mm": aten.index +
                                                aten.bmm), with ids the row's expert

W's layout says how the op reads a slice: OUT_IN when the product uses W[e] as (out, in) (F.linear, bmm(W[ids], x),
grouped_mm on W.transpose(-2, -1)), IN_OUT when as (in, out). The selector (offs, the index or the ids) is the
node (or int) the branch needs to pick each row's expert exactly as the base did: the LoRA follows the base's routing.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from lora_fx.passes.match import _owner, _parameter_name, layer_index
from lora_fx.site import IN_OUT, OUT_IN, Site

aten = torch.ops.aten


def _grouped_targets() -> set:
    """The grouped-matmul ops this torch and transformers have (transformers registers its op on import)."""
    targets = {aten._grouped_mm.default} if hasattr(aten, "_grouped_mm") else set()
    targets |= {f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None}
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None and hasattr(fallback, "default"):
        targets.add(fallback.default)
    return targets


_TRANSPOSES = {aten.transpose.int, torch.transpose}
_LINEAR = {F.linear, aten.linear.default}
_MATMUL = {torch.matmul, operator.matmul, torch.mm, aten.matmul.default, aten.mm.default}
_BMM = {torch.bmm, aten.bmm.default}


def _param3(gm: fx.GraphModule, node) -> str | None:
    name = _parameter_name(gm, node)
    return name if name is not None and gm.get_parameter(name).dim() == 3 else None


def _transposed_param(gm: fx.GraphModule, node) -> str | None:
    """The 3-D parameter W when `node` is W.transpose(-2, -1) (or (1, 2), W.mT), else None."""
    if not isinstance(node, fx.Node):
        return None
    is_transpose = (node.op == "call_function" and node.target in _TRANSPOSES) or \
        (node.op == "call_method" and node.target == "transpose")
    if is_transpose and len(node.args) == 3 and {d % 3 for d in node.args[1:]} == {1, 2}:
        return _param3(gm, node.args[0])
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",):
        return _param3(gm, node.args[0])
    return None


def _selected(gm: fx.GraphModule, node) -> tuple[str, object] | None:
    """(W, selector) when `node` picks experts out of a 3-D parameter along dim 0: W[e] (getitem with an int or a
    node), aten.select(W, 0, e), aten.index(W, [ids])."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    name = _param3(gm, node.args[0])
    if name is None:
        return None
    if node.target is operator.getitem and len(node.args) == 2 and isinstance(node.args[1], (int, fx.Node)):
        return name, node.args[1]
    if node.target is aten.select.int and node.args[1] == 0:
        return name, node.args[2]
    if node.target is aten.index.Tensor and len(node.args[1]) == 1 and isinstance(node.args[1][0], fx.Node):
        return name, node.args[1][0]
    return None


def _site(gm, model, node, weight: str, layout: str, input_arg, selector_arg, form: str) -> Site | None:
    w = gm.get_parameter(weight)
    if not isinstance(node.args[input_arg] if isinstance(input_arg, int) else node.kwargs.get(input_arg), fx.Node):
        return None
    n, d1, d2 = w.shape
    out_f, in_f = (d1, d2) if layout == OUT_IN else (d2, d1)
    module, module_type = _owner(model, weight)
    return Site(node=node.name, op=form, weight=weight, module=module, module_type=module_type,
                in_features=int(in_f), out_features=int(out_f), weight_layout=layout, has_bias=False,
                input_arg=input_arg, layer=layer_index(weight),
                params=(("num_experts", int(n)), ("form", form), ("selector_arg", selector_arg)))


def match_experts(gm: fx.GraphModule, model: nn.Module, node: fx.Node) -> tuple[Site, fx.Node | None] | None:
    """An op that reads a 3-D parameter's expert slices: a grouped matmul, or a linear/matmul/bmm of a slice."""
    if node.op != "call_function":
        return None
    if node.target in _grouped_targets():
        w_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("mat2", node.kwargs.get("weight"))
        offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
        if not isinstance(offs, fx.Node):
            return None  # 3-D x 3-D batched form: no jagged groups to follow
        weight, layout = _param3(gm, w_arg), IN_OUT
        if weight is None:
            weight, layout = _transposed_param(gm, w_arg), OUT_IN
        if weight is None:
            return None
        offs_arg = 2 if len(node.args) > 2 else "offs"
        site = _site(gm, model, node, weight, layout, 0, offs_arg, "grouped")
        return (site, w_arg) if site is not None else None
    if node.target in _LINEAR:
        picks = [(1, 0, OUT_IN, "x_first")]
    elif node.target in _MATMUL or node.target in _BMM:
        picks = [(1, 0, IN_OUT, "x_first"), (0, 1, OUT_IN, "w_first")]
    else:
        return None
    for w_index, x_index, layout, form in picks:
        if len(node.args) <= max(w_index, x_index):
            return None
        found = _selected(gm, node.args[w_index])
        if found is None:
            continue
        site = _site(gm, model, node, found[0], layout, x_index, w_index, form)
        return (site, node.args[w_index]) if site is not None else None
    return None


def selector(node: fx.Node, site: Site) -> object:
    """What the branch needs beside x to follow the routing: offs (grouped), the index or ids (a slice)."""
    where = site.param("selector_arg")
    if site.param("form") == "grouped":
        return node.args[where] if isinstance(where, int) else node.kwargs[where]
    picked = node.args[where]
    return picked.args[1][0] if picked.target is aten.index.Tensor else \
        picked.args[2] if picked.target is aten.select.int else picked.args[1]
