"""The ONNX-level fold's rewrite rule: one LoRA branch of an exported ONNX graph merged into its base weight.

An unmerged adapted model exports each adapted linear as a base linear plus a low-rank branch on the same input::

    y = base(x) + cast?( s · up(down(cast?(x))) )        base(x) = x·Wm (+ c)      down(h) = h·Am     up(h) = h·Bm

with ``base`` a ``MatMul(x, W)`` (3-D+ inputs; the exporter folds ``Wᵀ`` into a ``val_N`` initializer) or a
``Gemm(x, W, c?)`` (2-D inputs, ``transB=1`` for nn.Linear, ``transB=0`` for GPT-2's Conv1D), optionally followed by
a bias ``Add``; ``down``/``up`` are ``MatMul`` or ``Gemm`` nodes on constant A and B; ``s`` is the constant scaling
``alpha/r`` (its ``Mul`` is gone when s == 1); the two ``Cast`` nodes appear when the LoRA weights are kept in fp32
beside fp16/bf16 base weights. Writing every matrix in the "x · M" form (``Wm = Wᵀ`` when ``transB=1``)::

    x·Wm + s·x·Am·Bm = x·(Wm + s·Am·Bm)

so the fold sets ``Wm <- Wm + s·Am·Bm`` (in W's own layout), drops the branch and hands the Add's consumers the base
output. The sum is accumulated in fp64 by default (numpy; products of fp32/fp16 values are exact there) and rounded
once into W's dtype: at most half a unit in the last place from the exact W + s·B·A. ``accumulate_dtype=np.float32``
accumulates in fp32 as ``lora_fx.fold``'s default does (then a weight may differ from the exact sum by an ulp or two,
and from lora_fx.fold's by an ulp, as two BLAS libraries sum the r products in different orders).

The rule (`FoldLoraBranch`, an onnxscript ``RewriteRuleClassBase``) matches the branch and the Add; its ``check``
walks from the Add's other operand to the base linear and refuses, with a reason, when:

- the base is not a MatMul/Gemm (plus bias Add) reading the branch's input, or a Gemm has transA=1 / alpha != 1;
- W, A, B or the scaling is not a constant initializer (e.g. a ``Transpose`` of a tied weight, a graph input);
- W is read by any other node (a tied or shared weight: writing it would change the other user), or the base
  output / a branch intermediate is read outside the pattern (folding would change what that reader sees);
- shapes or dtypes do not fit, A, B or the scaling hold NaN/Inf, or the folded weight overflows its dtype.

A and B may be shared between branches (the exporter de-duplicates equal initializers, e.g. all-zero B's of an
untrained adapter): they are only read. W is the one tensor written, and ``check`` makes sure it has a single user,
which is why the new values go into W's existing initializer (same ``ir.Value``, same name) instead of a new
initializer: onnxscript's rewriter silently replaces an initializer of the same name, and a renamed one would break
the name-by-name comparison with the base export. The base linear's nodes are kept as they are (names, metadata,
attributes, input order), so the folded graph is the base export's graph. The matched Adds, the branch nodes and the
A/B/scaling initializers nobody reads any more are removed afterwards. The pass that applies the rule to a model
is ``passes/onnx_fold.py``; the repair of names the exporter derived from FX nodes is ``passes/onnx_fx_names.py``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
from onnxscript import ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

#: Metadata key where the torch exporter records the FX node a ONNX node came from; LoRA nodes mention lora_A/B.
_FX_NODE_KEY = "pkg.torch.onnx.fx_node"
_NAMESPACE_KEY = "namespace"
_LORA_PARAM = re.compile(r"lora_[AB]\b|lora_fx")
_FLOAT_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


@dataclasses.dataclass
class FoldRecord:
    """One folded branch: where, into which initializer, its rank, and the largest change it made."""

    site: str
    weight: str
    rank: int
    max_abs_delta: float


@dataclasses.dataclass
class FoldLog:
    """What the rules did, shared by every rule instance of one fold run."""

    accumulate: np.dtype = np.dtype(np.float64)
    folded: list[FoldRecord] = dataclasses.field(default_factory=list)
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)  # site -> reason (last one wins)
    renamed: list[tuple[ir.Value, str]] = dataclasses.field(default_factory=list)  # base outputs and their names
    keep: re.Pattern | None = None  # branches whose module path matches stay unfolded, on request
    kept: list[str] = dataclasses.field(default_factory=list)
    pending: dict[int, tuple[_Base, np.ndarray]] = dataclasses.field(default_factory=dict)  # id(Add) -> base, new W


@dataclasses.dataclass
class _Base:
    """The base linear found by check: its node, the weight value, and how it stores W."""

    node: ir.Node
    weight: ir.Value
    transposed: bool  # True when the node computes x·Wᵀ (Gemm transB=1)


class FoldLoraBranch(RewriteRuleClassBase):
    """``Add(base(x), [Cast](Mul([Cast](x) -> down -> up, s)))`` -> ``base(x)`` with W <- W + s·(A·B in x·M form).

    One instance per branch shape: ``branch_op`` ("MatMul" or "Gemm"), ``scaled`` (a Mul by s; False when s == 1)
    and ``cast`` (Cast nodes around the branch). ``fold_rules`` builds all of them over one shared `FoldLog`.
    """

    def __init__(self, log: FoldLog, *, branch_op: str = "MatMul", scaled: bool = True, cast: bool = False):
        if branch_op not in ("MatMul", "Gemm"):
            raise ValueError(f"branch_op must be 'MatMul' or 'Gemm', not {branch_op!r}")
        name = f"FoldLoraBranch[{branch_op}{'' if scaled else ',s=1'}{',cast' if cast else ''}]"
        super().__init__(name, remove_nodes=False)  # the base nodes stay; check() verifies every single use itself
        self.log, self.branch_op, self.scaled, self.cast = log, branch_op, scaled, cast

    # ------------------------------------------------------------------------------------------------ pattern
    def pattern(self, op, x, a, b, scale, base_out):
        h = op.Cast(x, _allow_other_attributes=True, _outputs=["x_cast"]) if self.cast else x
        if self.branch_op == "MatMul":
            down = op.MatMul(h, a, _outputs=["down"])
            up = op.MatMul(down, b, _outputs=["up"])
        else:
            down = op.Gemm(h, a, _allow_other_attributes=True, _outputs=["down"])
            up = op.Gemm(down, b, _allow_other_attributes=True, _outputs=["up"])
        delta = op.Mul(up, scale, _outputs=["scaled"]) if self.scaled else up
        if self.cast:
            delta = op.Cast(delta, _allow_other_attributes=True, _outputs=["cast_back"])
        return op.Add(base_out, delta, _outputs=["out"])

    # ------------------------------------------------------------------------------------------------ check
    def check(self, context, x: ir.Value, a: ir.Value, b: ir.Value, base_out: ir.Value, out: ir.Value,
              down: ir.Value, up: ir.Value, scale: ir.Value | None = None, scaled: ir.Value | None = None,
              x_cast: ir.Value | None = None, cast_back: ir.Value | None = None, **_: Any) -> MatchResult:
        result = MatchResult()
        add = out.producer()
        site = site_of(add)
        if self.log.keep is not None and self.log.keep.search(module_of(add)):
            if site not in self.log.kept and _looks_like_lora(add, down, up, a, b):
                self.log.kept.append(site)
            return result.fail(f"kept unfolded on request (matches {self.log.keep.pattern!r})")
        reason = self._reason(x, a, b, scale, base_out, add, down, up, cast_back)
        if isinstance(reason, str):
            if _looks_like_lora(add, down, up, a, b):  # not every x·A·B + y is a LoRA branch (attention is one)
                self.log.rejected[site] = reason
            return result.fail(reason)
        self.log.pending[id(add)] = reason  # (base, folded weight), used by rewrite
        self.log.rejected.pop(site, None)
        return result

    def _reason(self, x, a, b, scale, base_out, add, down, up, cast_back) -> str | tuple[_Base, np.ndarray]:
        """A reason to refuse, or the folded weight (computed here so nothing is written unless all is well)."""
        # The branch values (x_cast, down, up, ...) may have other readers (the exporter shares one Cast of x between
        # the q/k/v branches): the fold does not change what they hold, and the dead ones are removed afterwards.
        # What it does change is W and the base output, so those must have no reader outside the pattern.
        base = _find_base(x, base_out, add)
        if isinstance(base, str):
            return base
        w = base.weight
        constants = [("base weight", w), ("lora_A", a), ("lora_B", b)]
        constants += [("scaling", scale)] if scale is not None else []
        for role, value in constants:
            problem = _not_constant(value)
            if problem:
                return f"the {role} '{value.name}' {problem}"
        users = {node.name or "?" for node, _ in w.uses() if node is not base.node}
        if users or w.is_graph_output():
            return (f"the base weight '{w.name}' is also read by {sorted(users) or 'the graph outputs'}: writing the "
                    "fold into it would change those readers too (tied or shared weight)")
        if w.const_value.dtype not in _FLOAT_DTYPES:
            return f"the base weight '{w.name}' has dtype {w.const_value.dtype}, not a floating dtype"
        if cast_back is not None:
            to = cast_back.producer().attributes.get("to")
            if to is None or to.as_int() != w.const_value.dtype.value:
                return (f"the branch is cast to {to.as_int() if to else '?'}, not to the base weight's dtype "
                        f"{w.const_value.dtype}")
        elif a.const_value.dtype != w.const_value.dtype or b.const_value.dtype != w.const_value.dtype:
            return "lora_A/lora_B and the base weight have different dtypes and there is no Cast between them"
        try:
            am = _as_x_times(down.producer(), a.const_value.numpy(), self.log.accumulate, "lora_A")
            bm = _as_x_times(up.producer(), b.const_value.numpy(), self.log.accumulate, "lora_B")
        except ValueError as err:
            return str(err)
        s = np.float64(1.0)
        if scale is not None:
            s_array = np.asarray(scale.const_value.numpy())
            if s_array.size != 1:
                return f"the scaling '{scale.name}' has {s_array.size} elements, not one"
            s = s_array.reshape(()).astype(np.float64)
        for name, array in (("lora_A", am), ("lora_B", bm), ("scaling", s)):
            if not np.all(np.isfinite(array)):
                return f"{name} of this branch holds NaN or Inf: nothing was folded here"
        w_array = w.const_value.numpy()
        wm_shape = w_array.shape[::-1] if base.transposed else w_array.shape
        if w_array.ndim != 2 or am.shape[1] != bm.shape[0] or (am.shape[0], bm.shape[1]) != tuple(wm_shape):
            layout = " (transposed)" if base.transposed else ""
            return (f"shapes do not fit: base weight {tuple(w_array.shape)}{layout}, "
                    f"branch {tuple(am.shape)} x {tuple(bm.shape)}")
        acc = np.promote_types(self.log.accumulate, np.float32)
        delta = (am @ bm) * s.astype(acc)
        if base.transposed:
            delta = delta.T
        folded = (w_array.astype(acc) + delta).astype(w_array.dtype)
        if not np.all(np.isfinite(folded.astype(np.float32))):
            return f"the folded weight '{w.name}' overflows {w.const_value.dtype}: nothing was folded here"
        return base, folded

    # ------------------------------------------------------------------------------------------------ rewrite
    def rewrite(self, op, base_out: ir.Value, out: ir.Value, a: ir.Value, **_: Any) -> ir.Value:
        add = out.producer()
        base, folded = self.log.pending.pop(id(add))
        w = base.weight
        before = w.const_value.numpy()
        w.const_value = ir.Tensor(folded, name=w.name)  # in place: same Value, same name, single user (checked)
        self.log.folded.append(FoldRecord(site_of(add), w.name, int(min(a.const_value.shape)),
                                          float(np.max(np.abs(folded.astype(np.float64) - before.astype(np.float64))))))
        self.log.renamed.append((base_out, base_out.name))
        return base_out  # the Add's consumers read the base output; the branch is left dead and removed


# ---------------------------------------------------------------------------------------------------- helpers
def _find_base(x: ir.Value, base_out: ir.Value, add: ir.Node) -> _Base | str:
    """The base linear behind `base_out`: MatMul/Gemm(x, W) directly, or through one Add (the bias)."""
    uses = [node for node, _ in base_out.uses()]
    if uses != [add] or base_out.is_graph_output():
        return f"the base output '{base_out.name}' is also read outside the LoRA Add"
    node = base_out.producer()
    if node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        for inp in node.inputs:
            linear = inp.producer() if inp is not None else None
            if linear is not None and linear.op_type in ("MatMul", "Gemm") and linear.inputs[0] is x:
                if len(inp.uses()) != 1 or inp.is_graph_output():
                    return f"the base linear's output '{inp.name}' is also read outside the bias Add"
                node = linear
                break
    if node is None or node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
        kind = "a graph input" if node is None else f"a {node.op_type} node"
        return (f"the LoRA Add's other operand comes from {kind}, not from a MatMul/Gemm (+ bias Add) on the "
                "branch's input")
    if node.inputs[0] is not x:
        return f"the base {node.op_type} '{node.name}' reads '{node.inputs[0].name}', not the branch's input '{x.name}'"
    transposed = False
    if node.op_type == "Gemm":
        if _int_attr(node, "transA", 0):
            return f"the base Gemm '{node.name}' has transA=1"
        if _float_attr(node, "alpha", 1.0) != 1.0:
            return f"the base Gemm '{node.name}' has alpha={_float_attr(node, 'alpha', 1.0)} (only alpha=1 is folded)"
        transposed = bool(_int_attr(node, "transB", 0))
    return _Base(node, node.inputs[1], transposed)


def _looks_like_lora(add: ir.Node, down: ir.Value, up: ir.Value, a: ir.Value, b: ir.Value) -> bool:
    """Whether a refused match is worth reporting: the exporter's metadata or the weight names say LoRA, or A and B
    are both constant 2-D initializers (the matched shape, x·A·B + y, also occurs in attention with A, B computed)."""
    for node in (add, down.producer(), up.producer()):
        if _LORA_PARAM.search(node.metadata_props.get(_FX_NODE_KEY, "")):
            return True
    if any(v.name and _LORA_PARAM.search(v.name) for v in (a, b)):
        return True
    return all(v.is_initializer() and v.const_value is not None and len(v.const_value.shape) == 2 for v in (a, b))


def _as_x_times(node: ir.Node, array: np.ndarray, acc: np.dtype, role: str) -> np.ndarray:
    """The matrix M of a branch node in the form h·M, as `acc` (Gemm: transB, alpha; MatMul: as stored)."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{role} has shape {array.shape}: only 2-D LoRA weights are folded")
    m = array.astype(np.promote_types(acc, np.float32))
    if node.op_type == "Gemm":
        if _int_attr(node, "transA", 0):
            raise ValueError(f"the branch Gemm '{node.name}' has transA=1")
        if _int_attr(node, "transB", 0):
            m = m.T
        alpha = _float_attr(node, "alpha", 1.0)
        if alpha != 1.0:
            m = m * m.dtype.type(alpha)
    return m


def _not_constant(value: ir.Value) -> str | None:
    if value.is_graph_input():
        return "is a graph input (it can change at run time)"
    if not value.is_initializer() or value.const_value is None:
        producer = value.producer()
        origin = f"the output of a {producer.op_type} node" if producer is not None else "not an initializer"
        return f"is not a constant initializer ({origin})"
    return None


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def _branch_owner(node: ir.Node) -> str | None:
    """For a node of a LoRA branch module's forward (inject puts the branch module innermost in its module stack):
    the path of the module whose site it adapts ('' for the root); None for any other node."""
    segments = [seg.split(": ", 1)[0].strip() for seg in node.metadata_props.get(_NAMESPACE_KEY, "").split("/")]
    if len(segments) >= 3 and re.match(r"lora_fx(_\w+)?\.", segments[-2]):
        return segments[-3]
    return None


def module_of(node: ir.Node) -> str:
    """The path of the innermost module the torch exporter recorded for a node, or ''.

    The exporter's ``namespace`` reads ``<path>: <class>/<path>: <class>/.../<fx node>: <op>`` from the root module
    (path '') inwards, e.g. ``: BertModel/encoder: BertEncoder/.../encoder.layer.0.attention.self.query: Linear/add_4:
    aten.add.Tensor``: the module is the segment before the last."""
    segments = node.metadata_props.get(_NAMESPACE_KEY, "").split("/")
    return segments[-2].split(": ", 1)[0].strip() if len(segments) >= 2 else ""


def site_of(node: ir.Node) -> str:
    """A readable place for a node: its module path and its name."""
    module = module_of(node)
    return f"{module} ({node.name})" if module else (node.name or f"<{node.op_type}>")


def fold_rules(log: FoldLog) -> RewriteRuleSet:
    """Every shape of branch (MatMul/Gemm, with/without Mul, with/without Casts), tried with Add and Mul operands
    in both orders."""
    rules = [FoldLoraBranch.rule(log, branch_op=op, scaled=scaled, cast=cast)
             for op in ("MatMul", "Gemm") for scaled in (True, False) for cast in (False, True)]
    return RewriteRuleSet(rules, commute=True)
