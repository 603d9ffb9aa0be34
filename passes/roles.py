"""Roles pass: say what each linear-like site does in the model, from the graph's structure alone.

Names differ from model to model (q_proj, query, c_attn, in_proj_weight, Wq...); data flow does not. This pass
finds the attention ops in an FX graph and follows data flow from them back to the sites that feed them:

  attn.q / attn.k / attn.v   a site whose output reaches the query / key / value input of an attention op,
                             through "transparent" ops only (view, reshape, transpose, permute, contiguous,
                             split/chunk/getitem/select/slice, expand, dtype casts, dropout, clone, and the
                             elementwise mul/add/sub/div/neg/cat that rotary embeddings are made of), never
                             through another linear-like site.
  attn.out                   a site whose input comes from an attention op's output through layout-only ops
                             (view/reshape/transpose/permute/contiguous/getitem/dropout/casts, or a gating mul).
  mlp                        a site that is not an attention projection and lies on a residual branch: its output
                             flows, without passing through an attention op, into an `add` whose other operand
                             comes (through adds, casts, reshapes and dropout) from a node that is an ancestor of
                             the site. That is the MLP of a pre-norm or post-norm transformer block; heads,
                             poolers and input projections are not bypassed by a residual connection and get no
                             role.

Attention ops it knows:
  * scaled_dot_product_attention: F.scaled_dot_product_attention (symbolic tracing),
    aten.scaled_dot_product_attention and aten._scaled_dot_product_{flash,efficient,cudnn,...}_attention (export);
  * eager attention: a matmul/bmm/einsum/baddbmm of two activations (q, k^T) whose result reaches a softmax through
    scale/mask/softcap ops, the softmax's output reaching (through dropout/casts) the first operand of a second
    matmul whose other operand is v.

Packed weights (one linear computing q, k and v, e.g. GPT-2's c_attn, nn.MultiheadAttention's in_proj_weight, a fused
qkv Linear): `find_packed_rows` follows the site's output forward and keeps, for every element, which output feature
(row of the weight, in out_features order) it came from, through reshapes, transposes, split/chunk/unbind/select/
slice/getitem; at the attention op it reads the rows that reach each input. Shapes come from the graph
(node.meta["val"] from torch.export) or from running the graph once on example inputs (symbolic tracing).

More roles can be added with `register_role(name, finder)`; a finder gets (gm, sites, graph) where graph is the
networkx DiGraph of the FX graph (nodes are FX node names, the `node` attribute is the fx.Node, edges go from an
input to its user) and returns the names of the site nodes that have the role.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import networkx as nx
import torch
from torch import fx, nn

from lora_fx.site import Site

Q, K, V, OUT, MLP = "attn.q", "attn.k", "attn.v", "attn.out", "mlp"
QKV = (Q, K, V)

# ------------------------------------------------------------------------------------------------ op vocabulary
SDPA_OPS = {
    "scaled_dot_product_attention", "_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_attention_math_for_mps",
}
SOFTMAX_OPS = {"softmax", "_softmax", "_safe_softmax", "special_softmax"}
MATMUL_OPS = {"matmul", "bmm", "einsum", "baddbmm", "__matmul__", "mm"}

# Ops that pass their first argument through with its data intact (same elements, maybe fewer or moved).
LAYOUT_OPS = {
    "view", "reshape", "_unsafe_view", "_reshape_alias", "view_as", "reshape_as", "flatten", "unflatten",
    "transpose", "transpose_", "t", "permute", "movedim", "moveaxis", "swapaxes", "swapdims", "contiguous",
    "unsqueeze", "squeeze", "expand", "expand_as", "repeat", "repeat_interleave",
    "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "getitem", "select", "slice", "narrow",
    "clone", "alias", "detach", "lift_fresh_copy", "to", "_to_copy", "type", "type_as", "float", "half",
    "bfloat16", "double", "dropout", "feature_dropout", "alpha_dropout", "native_dropout", "identity",
}
# Elementwise ops and concatenation: the data of their tensor inputs flows through (scaled, rotated, joined).
VALUE_OPS = {"neg", "masked_fill", "mul", "div", "truediv", "add", "sub", "cat", "concat", "concatenate",
                   "stack", "where", "iadd", "imul", "isub", "itruediv", "mul_", "add_", "div_"}
# q/k/v walk: layout ops plus the elementwise ops rotary embeddings and scaling use.
QKV_TRANSPARENT = LAYOUT_OPS | VALUE_OPS
# attn.out walk: layout ops plus a gating mul, never an add (a residual add would mix the block's input in).
OUT_TRANSPARENT = LAYOUT_OPS | {"mul", "imul", "mul_"}
# Between the q@k^T matmul and softmax: scale, mask, bias, softcap.
SCORE_OPS = {"mul", "div", "truediv", "add", "sub", "masked_fill", "where", "tanh", "clamp", "to", "_to_copy",
             "type_as", "float", "half", "bfloat16", "contiguous", "view", "reshape", "_unsafe_view", "iadd",
             "imul", "itruediv", "add_", "mul_", "div_", "masked_fill_", "clone"}
# Between softmax and the probs@v matmul.
PROB_OPS = {"dropout", "native_dropout", "feature_dropout", "getitem", "to", "_to_copy", "type_as", "float", "half",
            "bfloat16", "contiguous", "view", "reshape", "_unsafe_view", "masked_fill", "masked_fill_", "mul",
            "clone", "identity", "where"}
# The residual stream: what may sit between a residual add's operand and the node it copies.
RESIDUAL_OPS = {"add", "iadd", "add_", "dropout", "native_dropout", "feature_dropout", "to", "_to_copy", "type_as",
                "float", "half", "bfloat16", "view", "reshape", "_unsafe_view", "contiguous", "clone", "identity",
                "getitem", "alias", "detach"}
ADD_OPS = {"add", "iadd", "add_"}
SUM_OPS = ADD_OPS | {"sub", "isub", "sub_"}
_MODULE_OPS = {nn.Dropout: "dropout", nn.Dropout1d: "dropout", nn.Dropout2d: "dropout", nn.AlphaDropout: "dropout",
               nn.Identity: "identity", nn.Softmax: "softmax", nn.Flatten: "flatten", nn.Unflatten: "unflatten"}


def op_name(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """One name per op whatever the front end: aten.view.default, Tensor.view, torch.reshape -> 'view'/'reshape'."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        target = node.target
        packet = getattr(target, "overloadpacket", None)  # torch.ops.aten.<op>.<overload>
        if packet is not None:
            return packet.__name__
        return getattr(target, "__name__", None)
    if node.op == "call_module":
        try:
            module = gm.get_submodule(node.target)
        except AttributeError:
            return None
        for cls, name in _MODULE_OPS.items():
            if isinstance(module, cls):
                return name
    return None


def _arg(node: fx.Node, index: int, name: str | None = None, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    return default


def _data_inputs(node: fx.Node, name: str | None) -> list[fx.Node]:
    """The inputs of a transparent op that carry the tensor's data (not sizes, masks or fill values)."""
    if name in ("cat", "concat", "concatenate", "stack"):
        tensors = _arg(node, 0, "tensors", ())
        return [t for t in tensors if isinstance(t, fx.Node)] if isinstance(tensors, (list, tuple)) else []
    if name == "where":
        return [a for a in node.args[1:3] if isinstance(a, fx.Node)]
    if name in VALUE_OPS - {"neg", "masked_fill"}:
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    first = _arg(node, 0, "input")
    return [first] if isinstance(first, fx.Node) else []


def _is_weight(node: Any) -> bool:
    """A parameter or buffer read straight from the module (get_attr), maybe through a cast."""
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.args and \
            op_name(None, node) in ("to", "_to_copy", "float", "type_as", "detach", "expand", "unsqueeze"):
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "get_attr"


# ------------------------------------------------------------------------------------------------ attention ops
@dataclass(frozen=True)
class Attention:
    """One attention op: the nodes feeding its query, key and value, and the node holding its output."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    output: fx.Node
    kind: str  # "sdpa" or "eager"
    nodes: tuple[fx.Node, ...]  # the op's own nodes (sdpa node; or matmul, softmax, matmul)


def _matmul_operands(gm: fx.GraphModule, node: fx.Node, name: str) -> tuple[Any, Any] | None:
    if name == "einsum":
        ops = node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = tuple(ops[0])
        if len(ops) != 2:
            return None
        a, b = ops
    elif name == "baddbmm":
        a, b = _arg(node, 1, "batch1"), _arg(node, 2, "batch2")
    else:
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or _is_weight(a) or _is_weight(b):
        return None  # a matmul on a weight is a projection (a site), or rotary frequencies, not attention
    return a, b


def find_attention(gm: fx.GraphModule) -> list[Attention]:
    """Every attention op in the graph, in graph order."""
    found = []
    names = {n: op_name(gm, n) for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        name = names[node]
        if name in SDPA_OPS:
            q, k, v = (_arg(node, i, key) for i, key in enumerate(("query", "key", "value")))
            if all(isinstance(t, fx.Node) for t in (q, k, v)):
                found.append(Attention(q, k, v, node, "sdpa", (node,)))
        elif name in SOFTMAX_OPS:
            found.extend(_eager_attention(gm, node, names))
    return found


def _eager_attention(gm: fx.GraphModule, softmax: fx.Node, names: dict) -> list[Attention]:
    """softmax(scale(q @ k^T) + mask) @ v, seen from its softmax node."""
    scores = []  # q @ k^T matmuls that reach the softmax through score ops
    seen, stack = set(), [_arg(softmax, 0, "input")]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        name = names.get(n)
        if name in MATMUL_OPS:
            operands = _matmul_operands(gm, n, name)
            if operands is not None:
                scores.append((n, *operands))
            continue
        if name in SCORE_OPS:
            stack.extend(a for a in n.all_input_nodes if a.op != "get_attr")
    if not scores:
        return []
    found, seen, stack = [], set(), [softmax]
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            name = names.get(user)
            if name in MATMUL_OPS:
                operands = _matmul_operands(gm, user, name)
                if operands is not None and operands[0] is n:
                    for mm, q, k in scores:
                        found.append(Attention(q, k, operands[1], user, "eager", (mm, softmax, user)))
            elif name in PROB_OPS:
                stack.append(user)
    return found


# ------------------------------------------------------------------------------------------------ the graph
def graph_of(gm: fx.GraphModule) -> nx.DiGraph:
    """The FX graph as a networkx DiGraph: node names, attribute `node` = the fx.Node, edges input -> user."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, node=node)
        for user in node.users:
            g.add_edge(node.name, user.name)
    return g


class _Analysis:
    """What the built-in role finders share, computed once per (gm, sites, graph)."""

    def __init__(self, gm: fx.GraphModule, sites: list[Site], graph: nx.DiGraph):
        self.gm, self.sites, self.graph = gm, sites, graph
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.site_nodes = {s.node for s in sites if s.node in self.nodes}
        self.site_terminals = frozenset(self.nodes[s] for s in self.site_nodes)
        self.names = {n: op_name(gm, n) for n in gm.graph.nodes}
        self.attention = find_attention(gm)
        self.attention_outputs = frozenset(a.output for a in self.attention)
        self.data_dependent = set()  # nodes computed from the graph's inputs (not only from weights/constants)
        for n in gm.graph.nodes:
            if n.op == "placeholder" or any(i in self.data_dependent for i in n.all_input_nodes):
                self.data_dependent.add(n)
        self._memo: dict[tuple, dict] = {}

    def sources(self, node: Any, transparent: set[str], terminals: frozenset | set) -> frozenset:
        """Terminal nodes that reach `node` backwards through `transparent` ops (memoized, iterative).

        A multi-input op whose inputs come from different terminals (a residual add of two sites) is not followed:
        the data there is a mix, not a projection's output. Inputs from no terminal (cos/sin, masks) are ignored.
        """
        if not isinstance(node, fx.Node):
            return frozenset()
        memo = self._memo.setdefault((id(transparent), id(terminals)), {})  # both live as long as the analysis
        stack = [(node, False)]
        while stack:  # post-order without recursion: models have thousands of nodes
            n, expanded = stack.pop()
            if expanded:
                inputs = _data_inputs(n, self.names[n])
                found = {memo.get(i, frozenset()) for i in inputs}
                found.discard(frozenset())
                if self.names[n] in SUM_OPS and any(not memo.get(i) and i in self.data_dependent for i in inputs):
                    found = set()  # x + f(x): a residual sum, not a projection's output
                memo[n] = next(iter(found)) if len(found) == 1 else frozenset()
                continue
            if n in memo:
                continue
            if n in terminals:
                memo[n] = frozenset([n])
            elif self.names.get(n) not in transparent:
                memo[n] = frozenset()
            else:
                stack.append((n, True))
                stack.extend((i, False) for i in _data_inputs(n, self.names[n]) if i not in memo)
        return memo[node]


def _analysis(gm: fx.GraphModule, sites: list[Site], graph: nx.DiGraph) -> _Analysis:
    cached = graph.graph.get("lora_fx.roles")
    if cached is None or cached.gm is not gm or cached.sites is not sites:
        cached = graph.graph["lora_fx.roles"] = _Analysis(gm, sites, graph)
    return cached


# ------------------------------------------------------------------------------------------------ built-in roles
def _qkv_finder(slot: str) -> Callable:
    def finder(gm: fx.GraphModule, sites: list[Site], graph: nx.DiGraph) -> set[str]:
        a = _analysis(gm, sites, graph)
        found = set()
        for att in a.attention:
            found |= {n.name for n in a.sources(getattr(att, slot), QKV_TRANSPARENT, a.site_terminals)}
        return found

    finder.__name__ = f"find_attn_{slot}"
    finder.__doc__ = f"Sites whose output reaches the {slot} input of an attention op."
    return finder


def find_attn_out(gm: fx.GraphModule, sites: list[Site], graph: nx.DiGraph) -> set[str]:
    """Sites whose input is an attention op's output, through layout-only ops."""
    a = _analysis(gm, sites, graph)
    terminals = a.attention_outputs
    found = set()
    for s in sites:
        node = a.nodes.get(s.node)
        if node is None or not terminals:
            continue
        x = node.args[s.input_arg] if len(node.args) > s.input_arg else None
        if a.sources(x, OUT_TRANSPARENT, terminals):
            found.add(s.node)
    return found


def find_mlp(gm: fx.GraphModule, sites: list[Site], graph: nx.DiGraph) -> set[str]:
    """Sites that are not attention projections and whose output a residual connection bypasses."""
    a = _analysis(gm, sites, graph)
    attention_roles = set()
    for role in (Q, K, V, OUT):
        attention_roles |= set(_REGISTRY[role](gm, sites, graph)) if role in _REGISTRY else set()
    attention_nodes = {n.name for att in a.attention for n in att.nodes}
    no_attention = graph.copy()
    no_attention.remove_nodes_from(attention_nodes)
    found = set()
    for s in sites:
        if s.node in attention_roles or s.node not in no_attention:
            continue
        down = nx.descendants(no_attention, s.node) | {s.node}
        up = None
        for name in down:
            node = a.nodes[name]
            if a.names[node] not in ADD_OPS:
                continue
            operands = [x for x in node.args[:2] if isinstance(x, fx.Node)]
            if len(operands) != 2:
                continue
            outside = [x for x in operands if x.name not in down]
            if len(outside) != 1:
                continue
            up = nx.ancestors(graph, s.node) if up is None else up
            if _residual_roots(a, outside[0]) & up:
                found.add(s.node)
                break
    return found


def _residual_roots(a: _Analysis, node: fx.Node) -> set[str]:
    """`node` and what it copies or sums through the residual stream (adds, casts, reshapes, dropout)."""
    roots, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.name in roots:
            continue
        roots.add(n.name)
        name = a.names.get(n)
        if name in RESIDUAL_OPS and n.name not in a.site_nodes:
            stack.extend(_data_inputs(n, name) if name not in ADD_OPS
                         else [x for x in n.args[:2] if isinstance(x, fx.Node)])
    return roots


RoleFinder = Callable[[fx.GraphModule, list, nx.DiGraph], Iterable[str]]
_REGISTRY: dict[str, RoleFinder] = {
    Q: _qkv_finder("q"),
    K: _qkv_finder("k"),
    V: _qkv_finder("v"),
    OUT: find_attn_out,
    MLP: find_mlp,
}
BUILTIN_ROLES = tuple(_REGISTRY)


def register_role(name: str, finder: RoleFinder, *, replace: bool = False) -> None:
    """Add a role: `finder(gm, sites, graph)` returns the names of the site nodes that have it.

    graph is `graph_of(gm)` (networkx DiGraph, node attribute `node` = fx.Node). Rules can then say role=name.
    replace=True overrides an existing role, built-in ones included."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a role name is a non-empty string, got {name!r}")
    if not callable(finder):
        raise TypeError(f"the finder for role {name!r} must be callable, got {type(finder).__name__}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"role {name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[name] = finder


def unregister_role(name: str) -> None:
    """Remove a role added with register_role (built-in roles come back with register_role(..., replace=True))."""
    _REGISTRY.pop(name, None)


def known_roles() -> tuple[str, ...]:
    """Every role a rule can name: the built-in ones and the registered ones, in registration order."""
    return tuple(_REGISTRY)


def find_roles(gm: fx.GraphModule, sites: list[Site], *, graph: nx.DiGraph | None = None,
               roles: Iterable[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Site node name -> the roles it has (in registry order); every site is a key, () when it has none."""
    graph = graph if graph is not None else graph_of(gm)
    sites = list(sites)
    wanted = known_roles() if roles is None else tuple(roles)
    result: dict[str, list[str]] = {s.node: [] for s in sites}
    for role in wanted:
        if role not in _REGISTRY:
            raise KeyError(f"unknown role {role!r}; known roles: {list(_REGISTRY)}")
        for name in _REGISTRY[role](gm, sites, graph):
            if name in result and role not in result[name]:
                result[name].append(role)
    graph.graph.pop("lora_fx.roles", None)
    return {k: tuple(v) for k, v in result.items()}


def with_roles(gm: fx.GraphModule, sites: list[Site], *, graph: nx.DiGraph | None = None,
               example_inputs: tuple | None = None, example_kwargs: dict | None = None) -> list[Site]:
    """The same sites with `roles` filled in (Site is frozen: new objects, same order).

    If Site has a `role_rows` field (row ranges per role of a packed weight), it is filled too, from
    find_packed_rows; example_inputs/example_kwargs give shapes to symbolic-trace graphs for that."""
    graph = graph if graph is not None else graph_of(gm)
    sites = list(sites)
    found = find_roles(gm, sites, graph=graph)
    out = [dataclasses.replace(s, roles=found.get(s.node, ())) for s in sites]
    if any(f.name == "role_rows" for f in dataclasses.fields(Site)) and any(set(r) & set(QKV) for r in found.values()):
        packed = find_packed_rows(gm, sites, graph=graph, example_inputs=example_inputs, example_kwargs=example_kwargs)
        out = [dataclasses.replace(s, role_rows=tuple(sorted(packed[s.node].items()))) if s.node in packed else s
               for s in out]
    return out


# ------------------------------------------------------------------------------------------------ packed weights
def record_shapes(gm: fx.GraphModule, example_args: tuple = (), example_kwargs: dict | None = None
                  ) -> dict[str, tuple[int, ...]]:
    """Run the graph once (no grad, eval mode) and note every tensor node's shape and every int it computes.

    {} when it cannot run (e.g. inputs that do not fit). Used for symbolic-trace graphs, which carry no shapes."""
    import inspect

    shapes: dict[str, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
            elif isinstance(out, int) and not isinstance(out, bool):
                shapes[n.name] = out  # sizes computed in the graph (split sizes, head counts)
            elif isinstance(out, (list, tuple)) and out and all(isinstance(o, torch.Tensor) for o in out):
                shapes[n.name] = [tuple(o.shape) for o in out]
            return out

    if isinstance(example_args, torch.Tensor):
        example_args = (example_args,)
    try:
        bound = inspect.signature(gm.forward).bind(*tuple(example_args or ()), **(example_kwargs or {}))
        bound.apply_defaults()
        from lora_fx.passes.trace import eval_mode  # eval: no BatchNorm statistics move, no random dropout

        with torch.no_grad(), eval_mode(gm):
            _Recorder(gm).run(*bound.arguments.values())
    except Exception:  # shapes are a help, not a requirement
        return {}
    return shapes


def _shape_of(node: Any, shapes: dict | None) -> Any:
    if not isinstance(node, fx.Node):
        return None
    if shapes and node.name in shapes:
        return shapes[node.name]
    val = node.meta.get("val")
    if val is None and "tensor_meta" in node.meta:
        val = node.meta["tensor_meta"]
    if isinstance(val, (list, tuple)):
        inner = [tuple(_dim(d) for d in v.shape) if hasattr(v, "shape") else None for v in val]
        return inner
    if hasattr(val, "shape"):
        return tuple(_dim(d) for d in val.shape)
    return None


def _dim(d: Any) -> Any:
    """An int, or a sympy expression for a symbolic size (torch.export's dynamic dims)."""
    import sympy

    if isinstance(d, int):
        return d
    expr = getattr(getattr(d, "node", None), "expr", None)
    if expr is not None:
        return int(expr) if getattr(expr, "is_number", False) else expr
    try:
        return int(d)
    except Exception:
        return sympy.Symbol(str(d), positive=True, integer=True)


def _eq(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    import sympy

    try:
        return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0
    except Exception:
        return False


def _less(a: Any, b: Any) -> bool:
    """a < b for sizes; a symbolic size counts as larger than any int (export specializes sizes 0 and 1)."""
    if isinstance(a, int) and isinstance(b, int):
        return a < b
    if isinstance(a, int):
        return True
    if isinstance(b, int):
        return False
    import sympy

    ratio = sympy.simplify(sympy.sympify(b) / sympy.sympify(a))
    if ratio.is_number:
        return bool(ratio > 1)
    return set(a.free_symbols) <= set(b.free_symbols)


@dataclass(frozen=True)
class _Map:
    """Which weight row each element of a tensor came from: row = base + sum(index[axis] * strides[axis]).

    `rows` is set when the exact map is lost (a non-affine reshape, a sum of two maps as in rotary embeddings):
    then only the set of rows is known, which layout ops keep and narrowing ops cannot follow."""

    strides: tuple[int, ...]
    base: int
    rows: frozenset | None = None


class _Lost(Exception):
    """The row map cannot be followed through this op (the set of rows would be a guess)."""


def _rows(m: _Map, shape: tuple) -> frozenset:
    if m.rows is not None:
        return m.rows
    axes = [(shape[i], s) for i, s in enumerate(m.strides) if s != 0 and shape[i] != 1]
    if any(not isinstance(n, int) for n, _ in axes):
        raise _Lost("a feature axis has a symbolic size")
    rows = {m.base}
    for n, s in axes:
        rows = {r + i * s for r in rows for i in range(n)}
    return frozenset(rows)


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _reshape(m: _Map, old: tuple, new: tuple) -> _Map | None:
    """Row map after a reshape from `old` to `new` (full shapes); None when it is not affine any more."""
    strides, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if j < len(new) and _eq(new[j], 1):
            strides.append(0)
            j += 1
            continue
        if i < len(old) and _eq(old[i], 1):
            i += 1
            continue
        if i >= len(old) or j >= len(new):
            raise _Lost("reshape sizes do not line up")
        bi, bj, pi, pj = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while not _eq(pi, pj):
            if _less(pi, pj):
                if i >= len(old):
                    raise _Lost("reshape sizes do not line up")
                pi, i = pi * old[i], i + 1
                bi.append(i - 1)
            else:
                if j >= len(new):
                    raise _Lost("reshape sizes do not line up")
                pj, j = pj * new[j], j + 1
                bj.append(j - 1)
        # old[bi] -> new[bj]: affine when the old strides are those of a row-major array times some c
        live = [k for k in bi if not _eq(old[k], 1)]
        c = m.strides[live[-1]]
        if c == 0:
            if any(m.strides[k] != 0 for k in live):
                return None
            strides.extend(0 for _ in bj)
            continue
        after = 1
        for k in reversed(live):
            if m.strides[k] != c * after or not isinstance(old[k], int):
                return None
            after *= old[k]
        if not all(isinstance(new[k], int) for k in bj):
            return None
        out, after = [], 1
        for k in reversed(bj):
            out.append(c * after)
            after *= new[k]
        strides.extend(reversed(out))
    return _Map(tuple(strides), m.base)


def _narrow(m: _Map, dim: int, start: int, step: int = 1, keep: bool = True) -> _Map:
    strides = list(m.strides)
    base = m.base + start * strides[dim]
    if keep:
        strides[dim] *= step
    else:
        del strides[dim]
    return _Map(tuple(strides), base)


RESHAPE_OPS = {"view", "reshape", "_unsafe_view", "_reshape_alias", "view_as", "reshape_as", "flatten", "unflatten"}
NARROW_OPS = {"select", "slice", "narrow", "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "getitem"}


class _Resolved:
    """A view of a node whose args and kwargs (except the tensor input) are resolved to constants."""

    def __init__(self, node: fx.Node, const: Callable):
        self.node, self.name, self.users = node, node.name, node.users
        self.args = (node.args[0], *(const(a) for a in node.args[1:])) if node.args else ()
        self.kwargs = {k: const(v) for k, v in node.kwargs.items() if k != "input"}
        if "input" in node.kwargs:
            self.kwargs["input"] = node.kwargs["input"]


class _Tracker:
    """Follows one site's output forward and records which rows reach each attention input."""

    def __init__(self, a: _Analysis, shapes: dict | None):
        self.a, self.shapes = a, shapes
        self.order = {n: i for i, n in enumerate(a.gm.graph.nodes)}
        self.slots: dict[fx.Node, list[str]] = {}
        for att in a.attention:
            for role, node in zip(QKV, (att.q, att.k, att.v)):
                self.slots.setdefault(node, []).append(role)

    def shape(self, node):
        node = node.node if isinstance(node, _Resolved) else node
        s = _shape_of(node, self.shapes)
        if s is None:
            raise _Lost(f"no shape for {node.name}")
        return s

    def track(self, site_node: fx.Node, out_features: int) -> dict[str, frozenset]:
        shape = self.shape(site_node)
        if not isinstance(shape, tuple) or shape[-1] != out_features:
            raise _Lost("the site's output is not (..., out_features)")
        maps: dict[fx.Node, Any] = {site_node: _Map(tuple(0 for _ in shape[:-1]) + (1,), 0)}
        found: dict[str, set] = {}
        heap, queued = [(self.order[site_node], site_node.name)], {site_node}
        while heap:
            _, name = heapq.heappop(heap)
            node = self.a.nodes[name]
            if node is not site_node:
                op = self.a.names.get(node)
                if node.name in self.a.site_nodes or op not in QKV_TRANSPARENT:
                    continue
                maps[node] = self.step(node, op, maps)
            for role in self.slots.get(node, ()):
                found.setdefault(role, set()).update(self.rows_of(node, maps[node]))
            for user in node.users:
                if user not in queued:
                    queued.add(user)
                    heapq.heappush(heap, (self.order[user], user.name))
        return {role: frozenset(rows) for role, rows in found.items()}

    def rows_of(self, node, m) -> frozenset:
        if isinstance(m, list):
            return frozenset().union(*(self.rows_of(node, p) for p in m))
        return _rows(m, self.shape(node))

    def frozen(self, node, rows) -> _Map:
        shape = self.shape(node)
        if not isinstance(shape, tuple):
            raise _Lost("pieces of a tensor whose row map is lost")
        return _Map(tuple(0 for _ in shape), 0, frozenset(rows))

    def const(self, value: Any) -> Any:
        """A literal argument, or the int a size node computes (recorded run, or torch.export's SymInt meta)."""
        if isinstance(value, (list, tuple)):
            return type(value)(self.const(v) for v in value)
        if isinstance(value, slice):
            return slice(self.const(value.start), self.const(value.stop), self.const(value.step))
        if isinstance(value, fx.Node):
            if self.shapes and isinstance(self.shapes.get(value.name), int):
                return self.shapes[value.name]
            val = value.meta.get("val")
            if isinstance(val, (int, torch.SymInt)):
                return _dim(val)
            raise _Lost(f"{value.name}: not a constant")
        return value

    def step(self, node: fx.Node, op: str, maps: dict) -> Any:
        src = _arg(node, 0, "input")
        if op not in VALUE_OPS:  # literal arguments of layout ops may be size nodes
            node = _Resolved(node, self.const)
        if op == "getitem" and isinstance(maps.get(src), list):
            return maps[src][node.args[1]]
        if op in VALUE_OPS - {"neg", "masked_fill"}:
            return self.combine(node, [i for i in _data_inputs(node, op) if i in maps], maps)
        if src not in maps:
            raise _Lost(f"{node.name}: tracked data is not its first input")
        m, shape = maps[src], self.shape(src)
        if isinstance(m, list) or not isinstance(shape, tuple):
            raise _Lost(f"{node.name}: op on a list of pieces")
        if m.rows is not None:
            if op in NARROW_OPS:
                raise _Lost(f"{node.name}: narrowing a tensor whose row map is lost")
            return self.frozen(node, m.rows)
        rank = len(shape)
        if op in RESHAPE_OPS:
            new = _reshape(m, shape, self.shape(node))
            return new if new is not None else self.frozen(node, _rows(m, shape))
        if op in ("transpose", "transpose_", "swapaxes", "swapdims"):
            d0, d1 = _norm(node.args[1], rank), _norm(node.args[2], rank)
            s = list(m.strides)
            s[d0], s[d1] = s[d1], s[d0]
            return _Map(tuple(s), m.base)
        if op == "t":
            return _Map(tuple(reversed(m.strides)), m.base)
        if op == "permute":
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            return _Map(tuple(m.strides[_norm(d, rank)] for d in dims), m.base)
        if op in ("movedim", "moveaxis"):
            src_d, dst_d = node.args[1], node.args[2]
            moved = [_norm(d, rank) for d in ([src_d] if isinstance(src_d, int) else src_d)]
            dst = [_norm(d, rank) for d in ([dst_d] if isinstance(dst_d, int) else dst_d)]
            order: list = [None] * rank
            for s_, d_ in zip(moved, dst):
                order[d_] = s_
            rest = iter(d for d in range(rank) if d not in moved)
            order = [x if x is not None else next(rest) for x in order]
            return _Map(tuple(m.strides[d] for d in order), m.base)
        if op == "unsqueeze":
            s = list(m.strides)
            s.insert(_norm(node.args[1], rank + 1), 0)
            return _Map(tuple(s), m.base)
        if op == "squeeze":
            dims = node.args[1] if len(node.args) > 1 else None
            if dims is None:
                keep = [i for i in range(rank) if not _eq(shape[i], 1)]
            else:
                dims = {_norm(d, rank) for d in ([dims] if isinstance(dims, int) else dims)}
                keep = [i for i in range(rank) if not (i in dims and _eq(shape[i], 1))]
            return _Map(tuple(m.strides[i] for i in keep), m.base)
        if op in ("expand", "expand_as", "repeat", "repeat_interleave"):
            out = self.shape(node)
            extra = len(out) - rank
            grown = [i for i in range(rank) if not _eq(shape[i], out[extra + i])]
            if op != "expand" and op != "expand_as" and any(m.strides[i] != 0 for i in grown):
                return self.frozen(node, _rows(m, shape))  # tiling a feature axis: rows repeat
            return _Map((0,) * extra + tuple(0 if i in grown else m.strides[i] for i in range(rank)), m.base)
        if op == "select":
            d, i = _norm(node.args[1], rank), node.args[2]
            return _narrow(m, d, i + shape[d] if i < 0 else i, keep=False)
        if op == "slice":
            d = _norm(_arg(node, 1, "dim", 0), rank)
            start, step = _arg(node, 2, "start", None), _arg(node, 4, "step", 1)
            if not isinstance(start, (int, type(None))) or not isinstance(step, int):
                raise _Lost("symbolic slice")
            start = start or 0
            return _narrow(m, d, start + shape[d] if start < 0 else start, step or 1)
        if op == "narrow":
            d, start = _norm(node.args[1], rank), node.args[2]
            return _narrow(m, d, start + shape[d] if start < 0 else start)
        if op in ("split", "split_with_sizes", "chunk", "unbind", "tensor_split"):
            return self.pieces(node, op, m, shape)
        if op == "getitem":
            return self.index(m, shape, node.args[1])
        if op == "native_dropout":
            return [m, m]
        return m  # contiguous, clone, casts, dropout, neg, masked_fill: same elements in the same places

    def combine(self, node, inputs, maps) -> _Map:
        """Elementwise ops, cat, stack: one tracked input keeps its map (broadcast); several merge into a set."""
        out = self.shape(node)
        op = self.a.names[node]
        if len(inputs) == 1 and op not in ("cat", "concat", "concatenate", "stack"):
            m, shape = maps[inputs[0]], self.shape(inputs[0])
            if isinstance(m, list):
                raise _Lost("elementwise op on pieces")
            if m.rows is not None:
                return self.frozen(node, m.rows)
            extra = len(out) - len(shape)
            return _Map((0,) * extra + tuple(0 if not _eq(shape[i], out[extra + i]) else m.strides[i]
                                             for i in range(len(shape))), m.base)
        return self.frozen(node, frozenset().union(*(self.rows_of(i, maps[i]) for i in inputs)))

    def pieces(self, node, op, m, shape) -> list:
        rank = len(shape)
        if op == "unbind":
            d = _norm(_arg(node, 1, "dim", 0), rank)
            return [_narrow(m, d, i, keep=False) for i in range(shape[d])]
        d = _norm(_arg(node, 2, "dim", 0), rank)
        length, spec = shape[d], node.args[1]
        if not isinstance(length, int):
            if m.strides[d] != 0:
                raise _Lost("symbolic split of a feature axis")
            n = len(self.shape(node))  # splitting a non-feature axis: every piece keeps m
            return [m] * n
        if op == "chunk":
            size = -(-length // spec)
            sizes = [min(size, length - o) for o in range(0, length, size)]
        elif op == "tensor_split":
            if isinstance(spec, int):
                q, r = divmod(length, spec)
                sizes = [q + (1 if i < r else 0) for i in range(spec)]
            else:
                bounds = [0, *spec, length]
                sizes = [max(0, b - a) for a, b in zip(bounds, bounds[1:])]
        elif isinstance(spec, int):
            sizes = [min(spec, length - o) for o in range(0, length, spec)]
        else:
            sizes = list(spec)
        if not all(isinstance(x, int) for x in sizes):
            raise _Lost("symbolic split sizes")
        offsets = itertools.accumulate([0] + sizes[:-1])
        return [_narrow(m, d, o) for o in offsets]

    def index(self, m, shape, idx) -> _Map:
        """x[...] in symbolic-trace graphs: ints, slices, None and Ellipsis."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        if real > len(shape):
            raise _Lost("too many indices")
        strides, base, axis, out = m.strides, m.base, 0, []
        for i in idx:
            if i is Ellipsis:
                skip = len(shape) - real
                out.extend(strides[axis:axis + skip])
                axis += skip
            elif i is None:
                out.append(0)
            elif isinstance(i, int):
                base += (i + shape[axis] if i < 0 else i) * strides[axis]
                axis += 1
            elif isinstance(i, slice) and all(isinstance(x, (int, type(None))) for x in (i.start, i.stop, i.step)):
                start = i.start or 0
                base += (start + shape[axis] if start < 0 else start) * strides[axis]
                out.append(strides[axis] * (i.step or 1))
                axis += 1
            else:
                raise _Lost("advanced indexing")
        out.extend(strides[axis:])
        return _Map(tuple(out), base)


def find_packed_rows(gm: fx.GraphModule, sites: list[Site], *, shapes: dict | None = None,
                     example_inputs: tuple | None = None, example_kwargs: dict | None = None,
                     graph: nx.DiGraph | None = None) -> dict[str, dict[str, tuple[tuple[int, int], ...]]]:
    """Packed sites: site node -> {role: row ranges [(start, end), ...] of the weight's output features}.

    A site is packed when its output feeds more than one of q/k/v, or only part of its rows feed one. Rows count in
    out_features order (rows of an (out, in) weight, columns of GPT-2's (in, out) Conv1D weight). Interleaved layouts
    (e.g. heads x [q|k|v]) give several ranges per role. Sites whose row map cannot be followed are left out.
    Shapes: node.meta (torch.export), `shapes`, or one run of the graph on example_inputs/example_kwargs.
    """
    graph = graph if graph is not None else graph_of(gm)
    sites = list(sites)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    has_meta = any("val" in n.meta or "tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    if shapes is None and not has_meta and (example_inputs is not None or example_kwargs):
        shapes = record_shapes(gm, tuple(example_inputs or ()), example_kwargs)
    a = _Analysis(gm, sites, graph)
    if not a.attention:
        return {}
    roles = find_roles(gm, sites, graph=graph, roles=QKV)
    tracker, real_sizes = _Tracker(a, shapes), None
    # torch.export's symbolic sizes can hide how a reshape splits rows (nn.MultiheadAttention's cross-attention
    # views (seq, batch·heads, 16·s/t)); the sizes of one real run line up where those do not
    can_run = has_meta and shapes is None and (example_inputs is not None or bool(example_kwargs))
    out = {}
    for s in sites:
        if not roles.get(s.node):
            continue
        rows = _track(tracker, a.nodes[s.node], s.out_features)
        if rows is None and can_run:
            real_sizes = real_sizes or _Tracker(a, record_shapes(gm, tuple(example_inputs or ()), example_kwargs))
            rows = _track(real_sizes, a.nodes[s.node], s.out_features)
        if rows is None:
            continue  # the row map got lost on the way: say nothing rather than guess
        full = frozenset(range(s.out_features))
        if not rows or (len(rows) == 1 and next(iter(rows.values())) == full):
            continue
        out[s.node] = {role: _ranges(rows[role]) for role in QKV if role in rows}
    return out


def _track(tracker: _Tracker, node: fx.Node, out_features: int) -> dict[str, frozenset] | None:
    """The rows reaching each of q/k/v, or None where the row map cannot be followed."""
    try:
        return tracker.track(node, out_features)
    except (_Lost, KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return None


def _ranges(rows: Iterable[int]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for r in sorted(rows):
        if out and out[-1][1] == r:
            out[-1][1] = r + 1
        else:
            out.append([r, r + 1])
    return tuple((a, b) for a, b in out)


def find_packed_roles(gm: fx.GraphModule, sites: list[Site], **options: Any) -> dict[str, dict[str, tuple[int, int]]]:
    """Packed sites whose roles each own one contiguous block of rows: site node -> {role: (start, end)}.

    E.g. GPT-2's c_attn (out 3*E): {"attn.q": (0, E), "attn.k": (E, 2E), "attn.v": (2E, 3E)}. A site with an
    interleaved layout is left out here; `find_packed_rows` gives its ranges. Options as for find_packed_rows."""
    out = {}
    for node, by_role in find_packed_rows(gm, sites, **options).items():
        if all(len(r) == 1 for r in by_role.values()):
            out[node] = {role: r[0] for role, r in by_role.items()}
    return out
