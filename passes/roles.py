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

Mixture-of-experts roles:
  moe.experts                an expert weight's site (a 3-D parameter read a slice per expert: the "experts" kind of
                             lora_fx.site_kinds, passes/match_experts.py).
  moe.router                 a linear-like site whose output reaches a top-k op (the expert choice) through
                             softmax/sigmoid, casts, layout ops and elementwise scaling or bias: the router (gate) of
                             an MoE layer. It has no `mlp` role, and a rule must name it to adapt it (docs/rules.md).

Attention ops it knows:
  * scaled_dot_product_attention: F.scaled_dot_product_attention (symbolic tracing),
    aten.scaled_dot_product_attention and aten._scaled_dot_product_{flash,efficient,cudnn,...}_attention (export);
  * eager attention: a matmul/bmm/einsum/baddbmm of two activations (q, k^T) whose result reaches a softmax through
    scale/mask/softcap ops, the softmax's output reaching (through dropout/casts) the first operand of a second
    matmul whose other operand is v.

Packed weights (one linear computing q, k and v, e.g. GPT-2's c_attn): such a site has every role it feeds; which
of its rows feeds which role is the packed-rows pass's job (lora_fx.passes.packed_rows), which `with_roles` calls.

More roles can be added with `register_role(name, finder)`; a finder gets (gm, sites, graph) where graph is the
networkx DiGraph of the FX graph (nodes are FX node names, the `node` attribute is the fx.Node, edges go from an
input to its user) and returns the names of the site nodes that have the role.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import networkx as nx
from torch import fx, nn

from lora_fx.passes.match import node_input
from lora_fx.site import Site

Q, K, V, OUT, MLP = "attn.q", "attn.k", "attn.v", "attn.out", "mlp"
EXPERTS, ROUTER = "moe.experts", "moe.router"
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


def call_arg(node: fx.Node, index: int, name: str | None = None, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    return default


def data_inputs(node: fx.Node, name: str | None) -> list[fx.Node]:
    """The inputs of a transparent op that carry the tensor's data (not sizes, masks or fill values)."""
    if name in ("cat", "concat", "concatenate", "stack"):
        tensors = call_arg(node, 0, "tensors", ())
        return [t for t in tensors if isinstance(t, fx.Node)] if isinstance(tensors, (list, tuple)) else []
    if name == "where":
        return [a for a in node.args[1:3] if isinstance(a, fx.Node)]
    if name in VALUE_OPS - {"neg", "masked_fill"}:
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    first = call_arg(node, 0, "input")
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
        a, b = call_arg(node, 1, "batch1"), call_arg(node, 2, "batch2")
    else:
        a, b = call_arg(node, 0, "input"), call_arg(node, 1, "other")
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
            q, k, v = (call_arg(node, i, key) for i, key in enumerate(("query", "key", "value")))
            if all(isinstance(t, fx.Node) for t in (q, k, v)):
                found.append(Attention(q, k, v, node, "sdpa", (node,)))
        elif name in SOFTMAX_OPS:
            found.extend(_eager_attention(gm, node, names))
    return found


def _eager_attention(gm: fx.GraphModule, softmax: fx.Node, names: dict) -> list[Attention]:
    """softmax(scale(q @ k^T) + mask) @ v, seen from its softmax node."""
    scores = []  # q @ k^T matmuls that reach the softmax through score ops
    seen, stack = set(), [call_arg(softmax, 0, "input")]
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


class Analysis:
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
                inputs = data_inputs(n, self.names[n])
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
                stack.extend((i, False) for i in data_inputs(n, self.names[n]) if i not in memo)
        return memo[node]


def _analysis(gm: fx.GraphModule, sites: list[Site], graph: nx.DiGraph) -> Analysis:
    cached = graph.graph.get("lora_fx.roles")
    if cached is None or cached.gm is not gm or cached.sites is not sites:
        cached = graph.graph["lora_fx.roles"] = Analysis(gm, sites, graph)
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
        x = node_input(node, s.input_arg) if isinstance(s.input_arg, str) or len(node.args) > s.input_arg else None
        if a.sources(x, OUT_TRANSPARENT, terminals):
            found.add(s.node)
    return found


def find_moe_experts(gm: fx.GraphModule, sites: list[Site], graph: nx.DiGraph) -> set[str]:
    """Sites of an expert weight (a 3-D parameter read one slice per expert)."""
    from lora_fx.site_kinds import kind_of  # the registry imports the match passes, which this module's users load

    return {s.node for s in sites if kind_of(s).name == "experts"}


# From a router's logits to its top-k: probabilities, casts, layout, scaling and a bias (DeepSeek's correction).
ROUTER_OPS = {"softmax", "_softmax", "sigmoid", "to", "_to_copy", "float", "type_as", "view", "reshape",
              "_unsafe_view", "contiguous", "add", "mul", "div", "truediv", "clone", "unsqueeze", "squeeze"}
TOPK_OPS = {"topk"}


def find_moe_router(gm: fx.GraphModule, sites: list[Site], graph: nx.DiGraph) -> set[str]:
    """Linear-like sites whose output reaches a top-k op through ROUTER_OPS: the choice of experts."""
    from lora_fx.site_kinds import kind_of

    a = _analysis(gm, sites, graph)
    found = set()
    for s in sites:
        node = a.nodes.get(s.node)
        if node is None or kind_of(s).name != "linear":
            continue
        frontier, seen = [node], {node}
        while frontier and s.node not in found:
            for user in frontier.pop().users:
                name = a.names.get(user)
                if name in TOPK_OPS:
                    found.add(s.node)
                elif name in ROUTER_OPS and user not in seen and user not in a.site_terminals:
                    seen.add(user)
                    frontier.append(user)
    return found


def find_mlp(gm: fx.GraphModule, sites: list[Site], graph: nx.DiGraph) -> set[str]:
    """Sites that are not attention projections nor MoE routers and whose output a residual connection bypasses."""
    a = _analysis(gm, sites, graph)
    attention_roles = set(find_moe_router(gm, sites, graph))
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


def _residual_roots(a: Analysis, node: fx.Node) -> set[str]:
    """`node` and what it copies or sums through the residual stream (adds, casts, reshapes, dropout)."""
    roots, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.name in roots:
            continue
        roots.add(n.name)
        name = a.names.get(n)
        if name in RESIDUAL_OPS and n.name not in a.site_nodes:
            stack.extend(data_inputs(n, name) if name not in ADD_OPS
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
_REGISTRY[EXPERTS], _REGISTRY[ROUTER] = find_moe_experts, find_moe_router
MOE_ROLES = (EXPERTS, ROUTER)  # built in too, after the attention and MLP roles


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

    Packed weights also get `role_rows` (row ranges per role) from lora_fx.passes.packed_rows, or `rows_lost` (why
    those could not be followed); example_inputs/example_kwargs give shapes to symbolic-trace graphs for that."""
    graph = graph if graph is not None else graph_of(gm)
    sites = list(sites)
    found = find_roles(gm, sites, graph=graph)
    out = [dataclasses.replace(s, roles=found.get(s.node, ())) for s in sites]
    if any(set(r) & set(QKV) for r in found.values()):
        from lora_fx.passes.packed_rows import find_packed_rows  # it builds on this module's analysis

        packed = find_packed_rows(gm, sites, graph=graph, example_inputs=example_inputs, example_kwargs=example_kwargs)
        out = [dataclasses.replace(s, role_rows=tuple(sorted(packed[s.node].items()))) if s.node in packed else
               dataclasses.replace(s, rows_lost=packed.lost[s.node]) if s.node in packed.lost else s for s in out]
    return out
