"""Packed-rows pass: which rows of a packed weight feed the query, the key and the value.

One linear may compute q, k and v at once (GPT-2's c_attn, nn.MultiheadAttention's in_proj_weight, a fused qkv
Linear). `find_packed_rows` follows such a site's output forward and keeps, for every element, which output feature
(row of the weight, in out_features order) it came from, through reshapes, transposes, split/chunk/unbind/select/
slice/getitem; at the attention op it reads the rows that reach each input. Shapes come from the graph
(node.meta["val"] from torch.export) or from running the graph once on example inputs (symbolic tracing, or an
export graph whose symbolic sizes hide how a reshape splits rows).

A site whose rows cannot be followed gets none, never a guess: `PackedRows.lost` says why for each such site, and
the roles pass records it on the Site (`rows_lost`), so `lora_fx.plan` shows it.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import networkx as nx
import torch
from torch import fx

from lora_fx.passes.roles import QKV, QKV_TRANSPARENT, VALUE_OPS, Analysis, call_arg, data_inputs, find_roles, graph_of
from lora_fx.site import Site


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

    def __init__(self, a: Analysis, shapes: dict | None):
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
        self.upper_bound = ""  # the first node where the rows found became an upper bound (see find_packed_rows)
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
        src = call_arg(node, 0, "input")
        if op not in VALUE_OPS:  # literal arguments of layout ops may be size nodes
            node = _Resolved(node, self.const)
        if op == "getitem" and isinstance(maps.get(src), list):
            return maps[src][node.args[1]]
        if op in VALUE_OPS - {"neg", "masked_fill"}:
            return self.combine(node, [i for i in data_inputs(node, op) if i in maps], maps)
        if src not in maps:
            raise _Lost(f"{node.name}: tracked data is not its first input")
        m, shape = maps[src], self.shape(src)
        if isinstance(m, list) or not isinstance(shape, tuple):
            raise _Lost(f"{node.name}: op on a list of pieces")
        if m.rows is not None:
            if op in NARROW_OPS:  # a part of it comes from some of those rows: keep them all, an upper bound
                self.upper_bound = self.upper_bound or node.name
                out = self.shape(node)
                if isinstance(out, list):  # split / chunk / unbind: pieces
                    return [_Map(tuple(0 for _ in piece), 0, m.rows) for piece in out]
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
            d = _norm(call_arg(node, 1, "dim", 0), rank)
            start, step = call_arg(node, 2, "start", None), call_arg(node, 4, "step", 1)
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
            d = _norm(call_arg(node, 1, "dim", 0), rank)
            return [_narrow(m, d, i, keep=False) for i in range(shape[d])]
        d = _norm(call_arg(node, 2, "dim", 0), rank)
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


class PackedRows(dict):
    """{site node: {role: row ranges}} for the packed sites, plus `lost`: {site node: why its rows could not be
    followed} for sites feeding several of q/k/v whose rows are unknown (never guessed)."""

    def __init__(self, rows: dict | None = None, lost: dict[str, str] | None = None):
        super().__init__(rows or {})
        self.lost: dict[str, str] = dict(lost or {})


def find_packed_rows(gm: fx.GraphModule, sites: list[Site], *, shapes: dict | None = None,
                     example_inputs: tuple | None = None, example_kwargs: dict | None = None,
                     graph: nx.DiGraph | None = None) -> PackedRows:
    """Packed sites: site node -> {role: row ranges [(start, end), ...] of the weight's output features}.

    A site is packed when its output feeds more than one of q/k/v, or only part of its rows feed one. Rows count in
    out_features order (rows of an (out, in) weight, columns of GPT-2's (in, out) Conv1D weight). Interleaved layouts
    (e.g. heads x [q|k|v]) give several ranges per role. Sites whose row map cannot be followed are left out and
    listed in `.lost` with the reason. Shapes: node.meta (torch.export), `shapes`, or one run of the graph on
    example_inputs/example_kwargs.
    """
    graph = graph if graph is not None else graph_of(gm)
    sites = list(sites)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    has_meta = any("val" in n.meta or "tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    if shapes is None and not has_meta and (example_inputs is not None or example_kwargs):
        shapes = record_shapes(gm, tuple(example_inputs or ()), example_kwargs)
    a = Analysis(gm, sites, graph)
    if not a.attention:
        return PackedRows()
    roles = find_roles(gm, sites, graph=graph, roles=QKV)
    tracker, real_sizes = _Tracker(a, shapes), None
    # torch.export's symbolic sizes can hide how a reshape splits rows (nn.MultiheadAttention's cross-attention
    # views (seq, batch·heads, 16·s/t)); the sizes of one real run line up where those do not
    can_run = has_meta and shapes is None and (example_inputs is not None or bool(example_kwargs))
    out = PackedRows()
    for s in sites:
        if not roles.get(s.node):
            continue
        rows, why = _track(tracker, a.nodes[s.node], s.out_features)
        if rows is None and can_run:
            real_sizes = real_sizes or _Tracker(a, record_shapes(gm, tuple(example_inputs or ()), example_kwargs))
            rows, why = _track(real_sizes, a.nodes[s.node], s.out_features)
        if rows is not None and tracker.upper_bound and _overlap(rows):
            # a part of a tensor whose row map was lost (RoPE's rotate_half mixes a head's features, and Phi-3
            # slices the rotated head again) is charged all of that tensor's rows: sound while the roles' rows
            # stay apart (each role still gets every row it reads, and none that another role reads)
            rows, why = None, f"{tracker.upper_bound}: narrowing a tensor whose row map is lost"
        if rows is None:
            if len(roles[s.node]) > 1:  # a packed weight whose slices stay unknown: say why
                out.lost[s.node] = why
            continue
        full = frozenset(range(s.out_features))
        if not rows or (len(rows) == 1 and next(iter(rows.values())) == full):
            continue
        out[s.node] = {role: _ranges(rows[role]) for role in QKV if role in rows}
    return out


def _overlap(rows: dict[str, frozenset]) -> bool:
    sets = list(rows.values())
    return any(a & b for i, a in enumerate(sets) for b in sets[i + 1:])


def _track(tracker: _Tracker, node: fx.Node, out_features: int) -> tuple[dict[str, frozenset] | None, str]:
    """(the rows reaching each of q/k/v, "") or (None, why the row map cannot be followed)."""
    try:
        return tracker.track(node, out_features), ""
    except _Lost as err:
        return None, str(err)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as err:  # an op the tracker misreads
        return None, f"{type(err).__name__} while following {node.name}: {err}"


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
