"""Check that two ONNX models have the same structure, fast enough for transformer-sized graphs.

A folded LoRA model must export to exactly the graph of its base model: same ops, same wiring, same initializer names,
dtypes and shapes; only weight values may differ. Each model becomes a directed graph (`onnx_graph` gives it as a
networkx.DiGraph) whose nodes carry name-free labels (names of intermediate values are exporter artefacts), and the
two graphs are compared by a hash over each node's ancestors and descendants in topological order, a label
histogram and node/edge counts. That is linear in
graph size (VF2 isomorphism is not, and may not finish on large non-isomorphic pairs). When the graphs differ, the
report says where: opsets, inputs/outputs, initializers by name, op counts, labels only on one side, and the first
node in topological order whose ancestry has no counterpart on the other side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import os
import pathlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import networkx as nx
import onnx
from onnx import helper

from lora_fx.errors import VerifyError

#: Initializers the exporter names itself (e.g. ``val_12`` for a transposed weight folded into a constant) get a
#: counter-based name that shifts with unrelated graph edits; they are compared by dtype, shape and position only.
GENERATED_INITIALIZER = re.compile(r"val_\d+(/.*)?")

#: Integer tensors up to this many elements (reshape targets, axes, ...) are compared by value; they are structure,
#: not weights. Larger and floating tensors are compared by dtype and shape only.
SMALL_INT_TENSOR = 64

_INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
              onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
              onnx.TensorProto.BOOL}
_LISTED = 8  # how many items a difference line lists before "..."


@dataclasses.dataclass
class GraphCounts:
    """Sizes of one model's comparison graph."""

    ops: int
    initializers: int
    inputs: int
    outputs: int
    edges: int
    fingerprint: str


@dataclasses.dataclass
class VerifyReport:
    """Outcome of verify_onnx: `identical` is True only when no difference was found."""

    identical: bool
    differences: list[str]
    base: GraphCounts
    merged: GraphCounts
    base_name: str = "base"
    merged_name: str = "merged"

    def __bool__(self) -> bool:
        return self.identical

    def __str__(self) -> str:
        rows = [("", "base", "merged")] + [
            (field, str(getattr(self.base, field)), str(getattr(self.merged, field)))
            for field in ("ops", "initializers", "inputs", "outputs", "edges", "fingerprint")
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"ONNX structure: {'IDENTICAL' if self.identical else 'DIFFERENT'}"
                 f" ({self.base_name} vs {self.merged_name})"]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines += [f"  - {difference}" for difference in self.differences]
        return "\n".join(lines)


def verify_onnx(base: str | os.PathLike | onnx.ModelProto, merged: str | os.PathLike | onnx.ModelProto) -> VerifyReport:
    """Compare the structure of two ONNX models (paths or ModelProtos); weight values are not compared."""
    base_model, base_name = _load(base, "base")
    merged_model, merged_name = _load(merged, "merged")
    with _no_gc():
        a, b = _Structure(base_model), _Structure(merged_model)

    differences = _opset_differences(base_model, merged_model)
    differences += _interface_differences("input", a.inputs, b.inputs)
    differences += _interface_differences("output", a.outputs, b.outputs)
    differences += _initializer_differences(a, b)
    differences += _function_differences(base_model, merged_model)
    differences += _histogram_differences(a, b)
    if a.fingerprint != b.fingerprint or a.counts().edges != b.counts().edges:
        differences += _wiring_differences(a, b)
    return VerifyReport(not differences, differences, a.counts(), b.counts(), base_name, merged_name)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: building many small objects next to a big protobuf triggers full
    collections that otherwise take two thirds of the time (nothing built here forms cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def onnx_graph(model: str | os.PathLike | onnx.ModelProto) -> nx.DiGraph:
    """The comparison graph verify_onnx hashes, as a networkx.DiGraph, for inspecting a difference by hand (e.g.
    running VF2 on a small region). Node attributes: label, name; edge attribute: slot."""
    proto, _ = _load(model, "model")
    return _Structure(proto).graph


def _load(model: str | os.PathLike | onnx.ModelProto, role: str) -> tuple[onnx.ModelProto, str]:
    """Check and load one model; initializer data stays on disk (only dtypes and shapes are needed)."""
    if isinstance(model, onnx.ModelProto):
        where = f"<{role} ModelProto>"
        try:
            onnx.checker.check_model(model)
        except Exception as err:
            raise VerifyError(f"the {role} model is not a valid ONNX model: {err}", where=where,
                              fix="pass a model produced by lora_fx.export_onnx or onnx.load") from err
        return model, where
    path = pathlib.Path(model)
    if not path.is_file():
        raise VerifyError(f"the {role} ONNX file does not exist", where=str(path),
                          fix="check the path, or export the model first with lora_fx.export_onnx")
    try:
        onnx.checker.check_model(str(path))
        return onnx.load(str(path), load_external_data=False), str(path)
    except Exception as err:
        raise VerifyError(f"the {role} file is not a valid ONNX model: {type(err).__name__}: {err}", where=str(path),
                          fix="re-export it with lora_fx.export_onnx; a truncated or non-ONNX file cannot be verified") from err


class _Structure:
    """The comparison graph of one ONNX graph, with per-node hashes.

    Graph nodes: ("op", i) per ONNX node, ("init", name) per initializer, ("input", k) / ("output", k) per graph
    input / output, ("outer", name) for values a subgraph takes from its parent. Node attribute ``label`` is the
    name-free label; edge attribute ``slot`` lists ``"<producer output>><consumer input>"`` pairs (several when one
    node feeds another twice, e.g. Mul(x, x)).
    """

    def __init__(self, model: onnx.ModelProto | onnx.GraphProto) -> None:
        graph = model.graph if isinstance(model, onnx.ModelProto) else model
        self.ops = list(graph.node)
        self.initializers = {init.name: (init.data_type, tuple(init.dims)) for init in graph.initializer}
        graph_inputs = [v for v in graph.input if v.name not in self.initializers]
        self.inputs = [_value_label(v) for v in graph_inputs]
        self.outputs = [_value_label(v) for v in graph.output]

        self.labels: dict[tuple, str] = {}
        self.names: dict[tuple, str] = {}
        self.op_types: list[str] = [_op_name(node) for node in self.ops]
        self._edges: dict[tuple, list[str]] = {}
        self._producers: dict[str, tuple[tuple, int]] = {}
        for init in graph.initializer:
            self._add(("init", init.name), _initializer_label(init), init.name, outputs=[init.name])
        for k, value in enumerate(graph_inputs):
            self._add(("input", k), f"input|{k}|{self.inputs[k]}", value.name, outputs=[value.name])
        for i, node in enumerate(self.ops):
            key = ("op", i)
            self._add(key, _node_label(node), node.name or f"#{i}", inputs=node.input, outputs=node.output)
        for k, value in enumerate(graph.output):
            self._add(("output", k), f"output|{k}|{self.outputs[k]}", value.name, inputs=[value.name])

        preds: dict[tuple, list[tuple[str, tuple]]] = {key: [] for key in self.labels}
        succs: dict[tuple, list[tuple[str, tuple]]] = {key: [] for key in self.labels}
        for (u, v), slots in self._edges.items():
            slot = ",".join(sorted(slots)) if len(slots) > 1 else slots[0]
            preds[v].append((slot, u))
            succs[u].append((slot, v))
        self.order = self._topological_order()
        self.up = self._hashes(self.order, preds)
        self.down = self._hashes(reversed(self.order), succs)
        self.fingerprint = _digest("\n".join(sorted(self.up[n] + self.down[n] for n in self.order)))[:16]

    def _add(self, key: tuple, label: str, name: str, inputs: Sequence[str] = (), outputs: Sequence[str] = ()) -> None:
        self.labels[key], self.names[key] = label, name
        for slot, value in enumerate(inputs):
            if not value:
                continue  # an omitted optional input; its position shows in the other slots' numbers
            if value not in self._producers:  # a subgraph reading a value of its parent scope
                self.labels[("outer", value)], self.names[("outer", value)] = "outer", value
                self._producers[value] = (("outer", value), 0)
            producer, out = self._producers[value]
            self._edges.setdefault((producer, key), []).append(f"{out}>{slot}")
        for out, value in enumerate(outputs):
            if value:
                self._producers[value] = (key, out)

    @functools.cached_property
    def graph(self) -> nx.DiGraph:
        """The comparison graph as a networkx.DiGraph (built on first use: the hashes do not need it)."""
        graph = nx.DiGraph()
        graph.add_nodes_from((key, {"label": label, "name": self.names[key]}) for key, label in self.labels.items())
        graph.add_edges_from((u, v, {"slot": ",".join(sorted(slots))}) for (u, v), slots in self._edges.items())
        return graph

    def _topological_order(self) -> list[tuple]:
        """File order when it is topological (ONNX requires it; the checker enforces it), else a computed one."""
        order = list(self.labels)
        position = {key: i for i, key in enumerate(order)}
        if all(position[u] < position[v] for u, v in self._edges):
            return order
        return list(nx.lexicographical_topological_sort(self.graph, key=position.__getitem__))

    def _hashes(self, order: Iterable[tuple], neighbours: dict[tuple, list[tuple[str, tuple]]]) -> dict[tuple, str]:
        """Hash each node from its label and its already-hashed neighbours (ancestors or descendants)."""
        hashes: dict[tuple, str] = {}
        labels = self.labels
        for node in order:
            parts = sorted([slot + ":" + hashes[other] for slot, other in neighbours[node]])
            hashes[node] = _digest(labels[node] + "(" + ";".join(parts) + ")")
        return hashes

    def counts(self) -> GraphCounts:
        return GraphCounts(len(self.ops), len(self.initializers), len(self.inputs), len(self.outputs),
                           len(self._edges), self.fingerprint)

    def op_labels(self) -> Counter[str]:
        return Counter(self.labels[("op", i)] for i in range(len(self.ops)))

    def describe(self, node: tuple) -> str:
        if node[0] != "op":
            return f"{node[0]} '{self.names[node]}'"
        inputs = ", ".join(repr(v) for v in self.ops[node[1]].input)
        return f"node '{self.names[node]}' ({self.op_types[node[1]]}; inputs {inputs})"


def _opset_differences(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    opsets_a = {o.domain or "ai.onnx": o.version for o in a.opset_import}
    opsets_b = {o.domain or "ai.onnx": o.version for o in b.opset_import}
    return [f"opset import '{domain}': base {opsets_a.get(domain, 'absent')} vs merged {opsets_b.get(domain, 'absent')}"
            for domain in sorted(set(opsets_a) | set(opsets_b)) if opsets_a.get(domain) != opsets_b.get(domain)]


def _interface_differences(kind: str, a: Sequence[str], b: Sequence[str]) -> list[str]:
    differences = [f"graph {kind} {k}: base {x} vs merged {y}" for k, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b):
        differences.append(f"graph {kind}s: base has {len(a)}, merged has {len(b)}")
    return differences


def _initializer_differences(a: _Structure, b: _Structure) -> list[str]:
    """Named initializers by name; exporter-generated ones (val_N) as a multiset of their labels."""
    named_a = {name for name in a.initializers if not GENERATED_INITIALIZER.fullmatch(name)}
    named_b = {name for name in b.initializers if not GENERATED_INITIALIZER.fullmatch(name)}
    differences = []
    for name in sorted(named_a & named_b):
        (dtype_a, shape_a), (dtype_b, shape_b) = a.initializers[name], b.initializers[name]
        if shape_a != shape_b:
            differences.append(f"initializer '{name}': shape {shape_a} vs {shape_b}")
        if dtype_a != dtype_b:
            differences.append(f"initializer '{name}': dtype {_dtype(dtype_a)} vs {_dtype(dtype_b)}")
        label_a, label_b = a.labels[("init", name)], b.labels[("init", name)]
        if (shape_a, dtype_a) == (shape_b, dtype_b) and label_a != label_b:  # a small integer tensor's values
            differences.append(f"initializer '{name}': values {label_a.split('=', 1)[-1]} vs {label_b.split('=', 1)[-1]}")
    for side, this, only in (("base", a, named_a - named_b), ("merged", b, named_b - named_a)):
        if only:
            differences.append(f"initializers only in {side}: " + _listing(
                f"'{n}' {_dtype(this.initializers[n][0])}{this.initializers[n][1]}" for n in sorted(only)))
    generated_a = Counter(a.labels[("init", n)].split("|", 2)[2] for n in a.initializers if n not in named_a)
    generated_b = Counter(b.labels[("init", n)].split("|", 2)[2] for n in b.initializers if n not in named_b)
    differences += _multiset_differences("exporter-generated initializers (val_N)", generated_a, generated_b)
    return differences


def _function_differences(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    """Model-local functions, compared by name and by the structure of their bodies."""
    bodies_a = {(f.domain, f.name): _function_fingerprint(f) for f in a.functions}
    bodies_b = {(f.domain, f.name): _function_fingerprint(f) for f in b.functions}
    differences = [f"function {domain}::{name}: bodies differ" for (domain, name) in sorted(set(bodies_a) & set(bodies_b))
                   if bodies_a[(domain, name)] != bodies_b[(domain, name)]]
    for side, only in (("base", set(bodies_a) - set(bodies_b)), ("merged", set(bodies_b) - set(bodies_a))):
        if only:
            differences.append(f"functions only in {side}: " + _listing(f"{d}::{n}" for d, n in sorted(only)))
    return differences


def _histogram_differences(a: _Structure, b: _Structure) -> list[str]:
    ops_a, ops_b = Counter(a.op_types), Counter(b.op_types)
    differences = [f"op histogram: base has {ops_a[op]} {op}, merged has {ops_b[op]} {op}"
                   for op in sorted(set(ops_a) | set(ops_b)) if ops_a[op] != ops_b[op]]
    differences += _multiset_differences("nodes", a.op_labels(), b.op_labels())
    return differences


def _wiring_differences(a: _Structure, b: _Structure) -> list[str]:
    """Name the first node (in each model's topological order) whose ancestry has no counterpart on the other side."""
    differences = []
    if a.counts().edges != b.counts().edges:
        differences.append(f"edges: base has {a.counts().edges}, merged has {b.counts().edges}")
    for side, this, other, other_name in (("base", a, b, "merged"), ("merged", b, a, "base")):
        first = _first_unmatched(this, other)
        if first is not None:
            differences.append(f"first node of {side} (topological order) with no counterpart in {other_name}: "
                               f"{this.describe(first)}")
    if len(differences) == 0:
        differences.append(f"graph fingerprints differ ({a.fingerprint} vs {b.fingerprint}) although every node's "
                           "inputs match: the difference is in how outputs are consumed")
    return differences


def _first_unmatched(this: _Structure, other: _Structure) -> object | None:
    """The first op (or graph output) whose hash over all its ancestors occurs on the other side fewer times."""
    available = Counter(other.up.values())
    for node in this.order:
        if available[this.up[node]] > 0:
            available[this.up[node]] -= 1
        elif node[0] in ("op", "output"):
            return node
    return None


def _multiset_differences(what: str, a: Counter[str], b: Counter[str]) -> list[str]:
    differences = []
    for side, only in (("base", a - b), ("merged", b - a)):
        if only:
            differences.append(f"{what} only in {side}: " + _listing(
                f"{count} x {label}" for label, count in sorted(only.items())))
    return differences


def _listing(items: Iterable[str]) -> str:
    items = list(items)
    return ", ".join(items[:_LISTED]) + (f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def _function_fingerprint(function: onnx.FunctionProto) -> str:
    graph = helper.make_graph(list(function.node), function.name,
                              [helper.make_value_info(name, onnx.TypeProto()) for name in function.input],
                              [helper.make_value_info(name, onnx.TypeProto()) for name in function.output])
    return _Structure(graph).fingerprint + "|" + ",".join(sorted(function.attribute))


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _node_label(node: onnx.NodeProto) -> str:
    """`op_type|domain|sorted attributes|arity`: everything about a node except names."""
    attributes = ",".join(f"{a.name}={_attribute(a)}" for a in sorted(node.attribute, key=lambda a: a.name))
    return f"{node.op_type}|{node.domain or 'ai.onnx'}|{attributes}|in={len(node.input)},out={len(node.output)}"


def _attribute(attribute: onnx.AttributeProto) -> str:
    kind = attribute.type
    if kind == onnx.AttributeProto.TENSOR:
        return _tensor_summary(attribute.t)
    if kind == onnx.AttributeProto.TENSORS:
        return "[" + ";".join(_tensor_summary(t) for t in attribute.tensors) + "]"
    if kind == onnx.AttributeProto.GRAPH:
        return "graph:" + _Structure(attribute.g).fingerprint
    if kind == onnx.AttributeProto.GRAPHS:
        return "graphs:[" + ";".join(_Structure(g).fingerprint for g in attribute.graphs) + "]"
    if kind == onnx.AttributeProto.SPARSE_TENSOR:
        return f"sparse:{_tensor_summary(attribute.sparse_tensor.values)}{tuple(attribute.sparse_tensor.dims)}"
    if attribute.ref_attr_name:
        return f"ref:{attribute.ref_attr_name}"
    value = helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return repr(value.decode("utf-8", "replace"))
    if isinstance(value, list):
        return "[" + ";".join(repr(v.decode("utf-8", "replace")) if isinstance(v, bytes) else repr(v) for v in value) + "]"
    return repr(value)


def _tensor_summary(tensor: onnx.TensorProto) -> str:
    """dtype and shape; values too for small integer tensors (they are shapes and axes, i.e. structure)."""
    shape = tuple(tensor.dims)
    summary = f"tensor({_dtype(tensor.data_type)},{shape})"
    size = 1
    for dim in shape:
        size *= dim
    if tensor.data_type in _INT_TYPES and size <= SMALL_INT_TENSOR and tensor.data_location != onnx.TensorProto.EXTERNAL:
        summary += "=" + repr(onnx.numpy_helper.to_array(tensor).tolist())
    return summary


def _initializer_label(init: onnx.TensorProto) -> str:
    name = "<generated>" if GENERATED_INITIALIZER.fullmatch(init.name) else init.name
    return f"init|{name}|{_tensor_summary(init)}"


def _value_label(value: onnx.ValueInfoProto) -> str:
    """dtype and shape of a graph input/output, with symbolic dims by name; no value name."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return kind or "untyped"
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return f"{_dtype(tensor.elem_type)}[?]"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return f"{_dtype(tensor.elem_type)}[{','.join(dims)}]"


def _dtype(data_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"dtype{data_type}"


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
