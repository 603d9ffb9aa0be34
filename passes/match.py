"""Match pass: find every linear-like call on a parameter and describe it as a Site.

The ops it knows, as a table (node op, target) -> (op kind, where x is, where W is, W's layout):
"""

from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.nn.functional as F
from torch import fx, nn

from lora_fx.site import IN_OUT, OUT_IN, Site

aten = torch.ops.aten

# call_function targets: target -> (op kind, index of x, index of W, W layout, index of bias or None)
FUNCTION_PATTERNS: dict = {
    F.linear: ("functional_linear", 0, 1, OUT_IN, 2),
    aten.linear.default: ("functional_linear", 0, 1, OUT_IN, 2),
    torch.matmul: ("matmul", 0, 1, IN_OUT, None),
    operator.matmul: ("matmul", 0, 1, IN_OUT, None),
    torch.mm: ("matmul", 0, 1, IN_OUT, None),
    aten.matmul.default: ("matmul", 0, 1, IN_OUT, None),
    aten.mm.default: ("matmul", 0, 1, IN_OUT, None),
    torch.addmm: ("matmul", 1, 2, IN_OUT, 0),
    aten.addmm.default: ("matmul", 1, 2, IN_OUT, 0),
}
# call_method targets on the activation: x.matmul(W), x.mm(W)
METHOD_PATTERNS: dict = {
    "matmul": ("matmul", 0, 1, IN_OUT, None),
    "mm": ("matmul", 0, 1, IN_OUT, None),
}

# The i in "layers.3.", "h.3.", "blocks.3.", "layer.3.", "block.3." (PEFT's layers_pattern defaults).
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    m = LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def _parameter_name(gm: fx.GraphModule, arg) -> str | None:
    """The qualified name of the parameter a node argument reads, or None if it is not a bare parameter."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        try:
            gm.get_parameter(arg.target)
        except AttributeError:
            return None
        return arg.target
    return None


# ops that take rows out of a weight (dim 0) before a linear: split sizes / chunks are indexed by a getitem
_SPLITS = {aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, torch.split, torch.chunk}


def _dim0(node: fx.Node, position: int) -> bool:
    dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", 0)
    return dim == 0


def _split_rows(gm: fx.GraphModule, node) -> tuple[str, list[tuple[int, int]]] | None:
    """(parameter, row ranges of its parts) for a split/chunk of a parameter along dim 0, else None."""
    is_split = (node.op == "call_function" and node.target in _SPLITS) or \
        (node.op == "call_method" and node.target in ("split", "chunk"))
    if not is_split or len(node.args) < 2 or not _dim0(node, 2):
        return None
    name = _parameter_name(gm, node.args[0])
    if name is None:
        return None
    n, how = gm.get_parameter(name).shape[0], node.args[1]
    chunk = node.target in (aten.chunk.default, torch.chunk, "chunk")
    if isinstance(how, int) and chunk:
        how = -(-n // how)  # torch.chunk: parts of ceil(n / chunks) rows
    sizes = [min(how, n - i) for i in range(0, n, how)] if isinstance(how, int) else list(how)
    if not all(isinstance(k, int) for k in sizes) or sum(sizes) != n:
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return name, [(a, a + k) for a, k in zip(starts, sizes)]


def _weight_rows(gm: fx.GraphModule, arg) -> tuple[str, tuple[int, int] | None] | None:
    """(parameter name, rows read or None for all) when `arg` is a parameter or a row slice of one, else None.
    Row slices: split/chunk + getitem, w[a:b], aten.slice(w, 0, a, b), aten.narrow(w, 0, a, n)."""
    name = _parameter_name(gm, arg)
    if name is not None or not isinstance(arg, fx.Node) or arg.op != "call_function":
        return (name, None) if name is not None else None
    args = arg.args
    if arg.target is operator.getitem and len(args) == 2 and isinstance(args[0], fx.Node):
        src, index = args
        if isinstance(index, int):
            parts = _split_rows(gm, src)
            if parts and -len(parts[1]) <= index < len(parts[1]):
                return parts[0], parts[1][index]
        elif isinstance(index, slice) and index.step in (None, 1):
            name = _parameter_name(gm, src)
            if name is not None:
                start, stop, _ = index.indices(gm.get_parameter(name).shape[0])
                return (name, (start, stop)) if stop > start else None
        return None
    if arg.target in (aten.slice.Tensor, aten.narrow.default) and len(args) >= 4 and args[1] == 0:
        name = _parameter_name(gm, args[0])
        if name is None or (arg.target is aten.slice.Tensor and len(args) > 4 and args[4] != 1):
            return None
        n = gm.get_parameter(name).shape[0]
        start = args[2] if args[2] is not None else 0
        stop = args[2] + args[3] if arg.target is aten.narrow.default else min(args[3], n)
        return (name, (start, stop)) if isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= n \
            else None
    return None


def _owner(model: nn.Module, weight: str) -> tuple[str, str]:
    module_name = weight.rpartition(".")[0]
    try:
        owner = model.get_submodule(module_name)
    except AttributeError:
        return module_name, "Module"
    return module_name, type(owner).__name__


def _module_call_path(node: fx.Node) -> str | None:
    """For torch.export graphs: the module whose forward made this node (from nn_module_stack)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return re.sub(r"^L\['self'\]\.?", "", path)


def _site(gm, model, node, kind, x_idx, w_idx, layout, b_idx) -> Site | None:
    args = node.args
    if len(args) <= max(x_idx, w_idx):
        return None
    found = _weight_rows(gm, args[w_idx])
    if found is None or (found[1] is not None and layout != OUT_IN):  # only output rows of an (out, in) weight
        return None
    weight, rows = found
    w = gm.get_parameter(weight)
    if w.dim() != 2 or not isinstance(args[x_idx], fx.Node):
        return None
    module, module_type = _owner(model, weight)
    out_f, in_f = w.shape if layout == OUT_IN else reversed(w.shape)
    if rows is not None:
        out_f = rows[1] - rows[0]
    if kind == "functional_linear" and module_type in ("Linear", "NonDynamicallyQuantizableLinear") \
            and _module_call_path(node) == module and weight.endswith(".weight"):
        kind = "linear_module"  # torch.export's aten.linear that came from the nn.Linear's own forward
    if kind == "matmul" and module_type == "Conv1D":
        kind = "conv1d"  # GPT-2's Conv1D: addmm(bias, x, W) with W stored (in, out)
    has_bias = b_idx is not None and len(args) > b_idx and args[b_idx] is not None
    return Site(node=node.name, op=kind, weight=weight, module=module, module_type=module_type,
                in_features=int(in_f), out_features=int(out_f), weight_layout=layout, has_bias=has_bias,
                input_arg=x_idx, layer=layer_index(weight), weight_rows=rows)


def find_sites(gm: fx.GraphModule, model: nn.Module | None = None) -> list[Site]:
    """Every linear-like site in graph order. `model` (the traced model) gives module class names."""
    model = model if model is not None else gm
    sites, weight_args = [], {}  # weight_args: site node -> the node it takes W from (a parameter or a slice of one)
    for node in gm.graph.nodes:
        site = None
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.Linear) and node.args:
                w = module.weight
                _, module_type = _owner(model, f"{node.target}.weight")
                site = Site(node=node.name, op="linear_module", weight=f"{node.target}.weight",
                            module=node.target, module_type=module_type, in_features=w.shape[1],
                            out_features=w.shape[0], weight_layout=OUT_IN, has_bias=module.bias is not None,
                            input_arg=0, layer=layer_index(node.target))
        elif node.op in ("call_function", "call_method"):
            pattern = (FUNCTION_PATTERNS if node.op == "call_function" else METHOD_PATTERNS).get(node.target)
            if pattern is not None:
                site = _site(gm, model, node, *pattern)
                if site is not None:
                    weight_args[node.name] = node.args[pattern[2]]
        if site is not None:
            sites.append(site)
    return _with_other_readers(gm, sites, weight_args)


def _with_other_readers(gm: fx.GraphModule, sites: list[Site], weight_args: dict[str, fx.Node]) -> list[Site]:
    """Fill Site.other_readers: nodes that use a site's weight in any way other than as a site's weight
    argument. A get_attr of the weight feeding another op (torch.export's aten.embedding on the table), or a
    call of a module that owns it (symbolic tracing's nn.Embedding leaf), would see the folded weight too."""
    site_nodes = {s.node for s in sites}
    weights = {s.weight for s in sites}
    # the nodes between a parameter and a site's weight argument (split, getitem, slice) belong to that site
    plumbing = set()
    for arg in weight_args.values():
        while isinstance(arg, fx.Node) and arg.op != "get_attr":
            plumbing.add(arg.name)
            arg = arg.args[0] if arg.args else None
    readers: dict[str, list[str]] = {w: [] for w in weights}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in weights:
            frontier, seen = [node], set()
            while frontier:
                n = frontier.pop()
                for u in n.users:
                    if u.name in plumbing and u.name not in seen:
                        seen.add(u.name)
                        frontier.append(u)
                    elif u.name not in site_nodes and u.name not in plumbing:
                        readers[node.target].append(u.name)
        elif node.op == "call_module" and node.name not in site_nodes:
            for w in weights:
                if w.startswith(f"{node.target}."):
                    readers[w].append(node.name)
    return [dataclasses.replace(s, other_readers=tuple(readers[s.weight])) if readers[s.weight] else s
            for s in sites]
