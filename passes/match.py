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
# A matmul's W may also be an (out, in) parameter transposed, x @ W.T (Falcon's FalconLinear, hand-written layers):
# the transpose of a 2-D weight as each front end writes it -> the arguments that make it a plain 2-D transpose
_TRANSPOSES_OF_ARG0 = {aten.t.default, aten.numpy_T.default, aten.mT.default, torch.t, "t"}
_TRANSPOSE_DIMS = {aten.transpose.int, torch.transpose, "transpose"}  # (W, 0, 1) or (W, -1, -2)
_PERMUTES = {aten.permute.default, torch.permute, "permute"}  # (W, [1, 0]) or (W, 1, 0)

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


def _transposed_parameter(gm: fx.GraphModule, arg) -> str | None:
    """The parameter `arg` is the transpose of (W.T, W.t(), W.mT, W.transpose(0, 1), W.permute(1, 0) and their aten
    forms), for a 2-D parameter; else None."""
    if not isinstance(arg, fx.Node) or arg.op not in ("call_function", "call_method") or not arg.args:
        return None
    name = _parameter_name(gm, arg.args[0])
    if name is None or gm.get_parameter(name).dim() != 2:
        return None
    target, rest = arg.target, arg.args[1:]
    if target is getattr:  # torch.fx's W.T / W.mT
        return name if rest in (("T",), ("mT",)) else None
    dims = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else tuple(rest)
    if not all(isinstance(d, int) for d in dims):
        return None
    if target in _TRANSPOSES_OF_ARG0:
        return name if not dims else None
    if target in _TRANSPOSE_DIMS:
        return name if len(dims) == 2 and {d % 2 for d in dims} == {0, 1} else None
    return name if target in _PERMUTES and dims in ((1, 0), (-1, -2)) else None


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


# the parameter names of the call_function targets, for calls that pass them as keywords (timm's
# F.linear(x, weight=..., bias=...))
ARG_NAMES = {"functional_linear": ("input", "weight", "bias"), "matmul": ("input", "other")}
_ADDMM = (torch.addmm, aten.addmm.default)


def node_input(node: fx.Node, index: int | str) -> object:
    """A call's argument by position, or by keyword when Site.input_arg is a name."""
    return node.args[index] if isinstance(index, int) else node.kwargs.get(index)


def _positional(node: fx.Node, kind: str) -> tuple[tuple, tuple[str, ...]]:
    """node.args with keyword arguments put in their places (None where missing), and the names used."""
    names = ("input", "mat1", "mat2") if node.target in _ADDMM else ARG_NAMES.get(kind, ())
    args = list(node.args) + [node.kwargs.get(n) for n in names[len(node.args):]]
    return tuple(args), names


def _site(gm, model, node, kind, x_idx, w_idx, layout, b_idx) -> Site | None:
    args, names = _positional(node, kind)
    if len(args) <= max(x_idx, w_idx) or args[w_idx] is None:
        return None
    found = _weight_rows(gm, args[w_idx])
    if found is None and kind == "matmul":  # x @ W.T: the (out, in) weight W, transposed for the matmul
        transposed = _transposed_parameter(gm, args[w_idx])
        if transposed is not None:
            found, layout = (transposed, None), OUT_IN
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
    input_arg = x_idx if x_idx < len(node.args) else names[x_idx]
    return Site(node=node.name, op=kind, weight=weight, module=module, module_type=module_type,
                in_features=int(in_f), out_features=int(out_f), weight_layout=layout, has_bias=has_bias,
                input_arg=input_arg, layer=layer_index(weight), weight_rows=rows)


# ---------------------------------------------------------------------------------------------------- linear
def match_linear(gm: fx.GraphModule, model: nn.Module, node: fx.Node) -> tuple[Site, fx.Node | None] | None:
    """An nn.Linear call, or a call_function/call_method of FUNCTION_PATTERNS / METHOD_PATTERNS on a parameter."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear) or not node.args:
            return None
        w = module.weight
        _, module_type = _owner(model, f"{node.target}.weight")
        return Site(node=node.name, op="linear_module", weight=f"{node.target}.weight", module=node.target,
                    module_type=module_type, in_features=w.shape[1], out_features=w.shape[0], weight_layout=OUT_IN,
                    has_bias=module.bias is not None, input_arg=0, layer=layer_index(node.target)), None
    if node.op not in ("call_function", "call_method"):
        return None
    pattern = (FUNCTION_PATTERNS if node.op == "call_function" else METHOD_PATTERNS).get(node.target)
    site = _site(gm, model, node, *pattern) if pattern is not None else None
    return (site, _positional(node, pattern[0])[0][pattern[2]]) if site is not None else None


# ---------------------------------------------------------------------------------------------------- convolutions
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# call_function targets: (index of x, index of W, index of bias, then stride, padding, dilation, groups by position)
CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                  aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _ntuple(value, n: int):
    if isinstance(value, str):
        return value  # padding="same" / "valid"
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * n


def _conv_site(gm, model, node: fx.Node, weight: str, x_index: int, geometry: dict, module: str | None,
               module_type: str | None) -> Site | None:
    w = gm.get_parameter(weight)
    if not isinstance(node.args[x_index], fx.Node) or w.dim() < 3:
        return None
    n = w.dim() - 2
    if module is None:
        module, module_type = _owner(model, weight)
    params = (("kernel_size", tuple(w.shape[2:])), ("stride", _ntuple(geometry.get("stride", 1), n)),
              ("padding", _ntuple(geometry.get("padding", 0), n)), ("dilation", _ntuple(geometry.get("dilation", 1), n)),
              ("groups", int(geometry.get("groups", 1))), ("padding_mode", geometry.get("padding_mode", "zeros")))
    return Site(node=node.name, op="conv", weight=weight, module=module, module_type=module_type,
                in_features=int(w.shape[1]) * int(geometry.get("groups", 1)), out_features=int(w.shape[0]),
                weight_layout=OUT_IN, has_bias=bool(geometry.get("bias")), input_arg=x_index,
                layer=layer_index(weight), params=params)


def match_conv(gm: fx.GraphModule, model: nn.Module, node: fx.Node) -> tuple[Site, fx.Node | None] | None:
    """An nn.Conv1d/2d/3d call, F.conv1d/2d/3d or aten.conv*d / aten.convolution (not transposed) on a parameter."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, CONV_MODULES) or not node.args:
            return None
        _, module_type = _owner(model, f"{node.target}.weight")
        geometry = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
                    "padding_mode": m.padding_mode, "bias": m.bias is not None}
        site = _conv_site(gm, model, node, f"{node.target}.weight", 0, geometry, node.target, module_type)
        return (site, None) if site is not None else None
    if node.op != "call_function":
        return None
    if node.target is aten.convolution.default:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
    elif node.target in CONV_FUNCTIONS:
        names = _CONV_ARGS
    else:
        return None
    call = {**dict(zip(names, node.args)), **node.kwargs}
    weight = _parameter_name(gm, call.get("weight"))
    if weight is None or call.get("transposed", False):
        return None
    call["bias"] = call.get("bias") is not None
    site = _conv_site(gm, model, node, weight, 0, call, None, None)
    return (site, call_weight_arg(node, names)) if site is not None else None


def call_weight_arg(node: fx.Node, names: tuple[str, ...]) -> fx.Node:
    i = names.index("weight")
    return node.args[i] if len(node.args) > i else node.kwargs["weight"]


# ---------------------------------------------------------------------------------------------------- embeddings
def match_embedding(gm: fx.GraphModule, model: nn.Module, node: fx.Node) -> tuple[Site, fx.Node | None] | None:
    """An nn.Embedding call, F.embedding(ids, W) or aten.embedding(W, ids) on a parameter."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, nn.Embedding) or not node.args:
            return None
        weight, module, x_index, w_arg = f"{node.target}.weight", node.target, 0, None
        params = {"padding_idx": m.padding_idx, "max_norm": m.max_norm}
    elif node.op == "call_function" and node.target in (F.embedding, aten.embedding.default):
        names = ("input", "weight", "padding_idx", "max_norm") if node.target is F.embedding else \
            ("weight", "input", "padding_idx")
        call = {**dict(zip(names, node.args)), **node.kwargs}
        weight = _parameter_name(gm, call.get("weight"))
        if weight is None or not isinstance(call.get("input"), fx.Node):
            return None
        module, x_index, w_arg = None, names.index("input"), call["weight"]
        padding_idx = call.get("padding_idx")
        params = {"padding_idx": None if padding_idx in (None, -1) else padding_idx, "max_norm": call.get("max_norm")}
    else:
        return None
    w = gm.get_parameter(weight)
    if w.dim() != 2:
        return None
    if params["padding_idx"] is not None and params["padding_idx"] < 0:
        params["padding_idx"] += w.shape[0]
    module, module_type = (module, _owner(model, weight)[1]) if module is not None else _owner(model, weight)
    return Site(node=node.name, op="embedding", weight=weight, module=module, module_type=module_type,
                in_features=int(w.shape[0]), out_features=int(w.shape[1]), weight_layout=OUT_IN, has_bias=False,
                input_arg=x_index, layer=layer_index(weight), params=tuple(params.items())), w_arg


# ---------------------------------------------------------------------------------------------------- the pass
def find_sites(gm: fx.GraphModule, model: nn.Module | None = None) -> list[Site]:
    """Every site of every kind (lora_fx.site_kinds) in graph order. `model` (the traced model) gives module class
    names."""
    from lora_fx.site_kinds import KINDS  # the registry names the matchers of this module

    model = model if model is not None else gm
    sites, weight_args = [], {}  # weight_args: site node -> the node it takes W from (a parameter or a slice of one)
    for node in gm.graph.nodes:
        for kind in KINDS.values():
            found = kind.match(gm, model, node)
            if found is not None:
                site, weight_arg = found
                sites.append(site)
                if weight_arg is not None:
                    weight_args[node.name] = weight_arg
                break
    return _with_other_readers(gm, sites, weight_args)


def control_flow_weights(gm: fx.GraphModule) -> dict[str, str]:
    """{parameter name: the control-flow op} for weights (2-D or more) read only inside the subgraphs of a
    higher-order op (torch.cond's branches, while_loop, map, scan). Those subgraphs are not matched or rewritten,
    so their weights cannot take a LoRA: the caller says so instead of leaving them out silently."""
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        for arg in _flat(node):
            if arg.op == "get_attr":
                value = _attr(gm, arg.target)
                if isinstance(value, nn.Parameter) and value.dim() >= 2:
                    out[arg.target] = f"torch.{node.target.name()}"
    return out


def _flat(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _attr(gm: fx.GraphModule, target: str):
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return None


_METADATA_METHODS = ("size", "dim", "numel", "stride", "is_contiguous")
_METADATA_ATTRIBUTES = ("shape", "dtype", "device", "ndim", "is_cuda")


def _reads_only_metadata(node: fx.Node) -> bool:
    """W.size(-1), W.shape, W.dtype...: a read of the weight's metadata, which a fold does not change."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _METADATA_ATTRIBUTES
    return node.op == "call_function" and node.target in (aten.sym_size.int, aten.sym_numel.default)


def _with_other_readers(gm: fx.GraphModule, sites: list[Site], weight_args: dict[str, fx.Node]) -> list[Site]:
    """Fill Site.other_readers: nodes that use a site's weight in any way other than as the weight of a site of the
    same kind. A get_attr of the weight feeding another op (torch.export's aten.embedding on a table that an output
    projection also reads), or a call of a module that owns it, would see the folded weight too."""
    from lora_fx.site_kinds import kind_of

    kind = {s.node: kind_of(s).name for s in sites}
    # the nodes between a parameter and a site's weight argument (split, getitem, slice) belong to that site
    plumbing = set()
    for arg in weight_args.values():
        while isinstance(arg, fx.Node) and arg.op != "get_attr":
            plumbing.add(arg.name)
            arg = arg.args[0] if arg.args else None
    readers: dict[str, list[str]] = {s.weight: [] for s in sites}  # every reader of the weight but the plumbing
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in readers:
            frontier, seen = [node], set()
            while frontier:
                n = frontier.pop()
                for u in n.users:
                    if u.name in plumbing and u.name not in seen:
                        seen.add(u.name)
                        frontier.append(u)
                    elif u.name not in plumbing and not _reads_only_metadata(u):
                        readers[node.target].append(u.name)
        elif node.op == "call_module":
            for w in readers:
                if w.startswith(f"{node.target}."):
                    readers[w].append(node.name)
    out = []
    for s in sites:
        others = tuple(r for r in readers[s.weight] if kind.get(r) != kind[s.node])
        out.append(dataclasses.replace(s, other_readers=others) if others else s)
    return out
