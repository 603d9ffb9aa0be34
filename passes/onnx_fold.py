"""The ONNX-level fold as a pass over an onnx_ir Model: every LoRA branch merged into its base weight.

Applies the rewrite rule (``passes/onnx_fold_rule.py``, where the math and the refusals are), gives the base
outputs back the names the exporter gave them, renumbers the constants named after FX nodes
(``passes/onnx_fx_names.py``) and reports, per site, LoRA nodes no pattern matched. File I/O is
``lora_fx/onnx/fold.py``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
from onnxscript import ir

from lora_fx.passes.onnx_fold_rule import (_FX_NODE_KEY, _LORA_PARAM, _NAMESPACE_KEY, FoldLog, FoldRecord,
                                           _branch_owner, fold_rules, module_of)
from lora_fx.passes.onnx_fx_names import fx_references, renumber_fx_names


def lora_leftovers(model: ir.Model) -> dict[str, list[str]]:
    """{site: node names} of nodes that still read LoRA parameters, found by initializer names (``lora_A``/``lora_B``)
    and by the FX node the torch exporter recorded in each node's metadata."""
    left: dict[str, list[str]] = {}
    for node in model.graph:
        fx_node = node.metadata_props.get(_FX_NODE_KEY, "")
        named = any(v is not None and v.is_initializer() and v.name and _LORA_PARAM.search(v.name) for v in node.inputs)
        owner = _branch_owner(node)
        if named or owner is not None or re.search(r"%p_lora_fx\w*lora_[AB]\b", fx_node, re.I):
            site = owner if owner is not None else module_of(node)
            left.setdefault(site or node.name or node.op_type, []).append(node.name or node.op_type)
    return left


def _unfoldable_kind(model: ir.Model, names: list[str]) -> str | None:
    """The kind of site (lora_fx.site_kinds) whose branch module made these nodes, when the ONNX fold has no pattern
    for that kind."""
    from lora_fx.site_kinds import KINDS

    branches = {f"{k.branch.__module__}.{k.branch.__qualname__}": k for k in KINDS.values() if not k.onnx_foldable}
    for node in model.graph:
        if node.name in names:
            segments = node.metadata_props.get(_NAMESPACE_KEY, "").split("/")
            cls = segments[-2].split(": ", 1)[-1].strip() if len(segments) >= 2 else ""
            if cls in branches:
                return branches[cls].name
    return None


@dataclasses.dataclass
class OnnxFoldResult:
    folded: list[FoldRecord]
    rejected: list[str]
    kept: list[str] = dataclasses.field(default_factory=list)


def fold_lora_branches(model: ir.Model, accumulate_dtype: Any = np.float64,
                       keep: str | None = None) -> OnnxFoldResult:
    """Fold every LoRA branch of `model` in place; returns what was folded and, per site, why a branch was not.

    `keep`: a regular expression; branches whose module path it matches (re.search) are left unfolded on purpose
    (listed in ``kept``, not in ``rejected``), e.g. to turn an all-linears adapter into a q,v-only graph.
    """
    accumulate = np.dtype(accumulate_dtype)
    if accumulate not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"accumulate_dtype must be float32 or float64, not {accumulate}")
    log = FoldLog(accumulate=accumulate, keep=re.compile(keep) if keep is not None else None)
    references_before = fx_references(model)
    fold_rules(log).apply_to_model(model)  # with remove_nodes=False rules, it also removes the dead nodes/initializers
    for value, name in log.renamed:  # the rewriter gave each base output the removed Add's name: give it back
        if not value.is_graph_output() and name:
            value.name = name
    if log.folded:
        renumber_fx_names(model, references_before - fx_references(model))
    rejected = [f"{site}: {reason}" for site, reason in log.rejected.items()]
    rejected_sites = {site.split(" (")[0] for site in list(log.rejected) + log.kept}
    for site, nodes in lora_leftovers(model).items():
        if site not in rejected_sites:
            kind = _unfoldable_kind(model, nodes)
            why = (f"the ONNX fold has no pattern for LoRA on {kind} sites: fold in PyTorch (lora_fx.fold), then "
                   f"export" if kind else "LoRA nodes left that no fold pattern matched")
            rejected.append(f"{site}: {why} ({', '.join(nodes[:4])}{', ...' if len(nodes) > 4 else ''})")
    return OnnxFoldResult(log.folded, rejected, log.kept)
