"""Inject pass: add a LoRA branch beside each chosen site, leaving the base node untouched.

    y = linear(x, W0, b)                y = linear(x, W0, b)
    z = relu(y)           becomes       d = lora_fx.<key>(x)      # dropout -> A -> B -> scale
                                        y2 = add(y, d)
                                        z = relu(y2)

One LoraLinear per weight (a weight used at several sites gets one LoRA, called at each). The LoRA modules live
under the GraphModule's `lora_fx` ModuleDict, keyed by the weight's name with dots as underscores.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from lora_fx.errors import RuleError
from lora_fx.lora import LoraLinear
from lora_fx.passes.infra import PassResult, graph_signature
from lora_fx.rules import Decision, LoraSettings
from lora_fx.site import Site

CONTAINER = "lora_fx"  # name of the ModuleDict that holds the LoRA modules
BRANCH, ADD = "branch", "add"  # node.meta["lora_fx"] tags that the fold pass removes


@dataclass
class LoraState:
    """What adapt records on the GraphModule (gm.meta["lora_fx"]) so fold can undo it exactly."""

    frontend: str
    original_graph: list  # graph_signature of the traced graph before injection
    sites: list[Site]  # every candidate site found by the match pass
    decisions: list[Decision]
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA key -> weight name
    untied: set[str] = field(default_factory=set)  # tied weights the user chose to untie at fold


def adapter_key(weight: str, taken: set[str]) -> str:
    """'layers.0.attn.q.weight' -> 'layers_0_attn_q'; unique within `taken`."""
    base = re.sub(r"\W", "_", re.sub(r"\.weight$", "", weight)) or "weight"
    key, i = base, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    return key


def check_settings(weight: str, decisions: list[Decision]) -> LoraSettings:
    """One LoRA per weight: all its sites must agree on the settings; r must fit the weight."""
    settings = {d.settings for d in decisions}
    if len(settings) > 1:
        raise RuleError(
            f"weight {weight!r} is used at {len(decisions)} sites ({[d.site.node for d in decisions]}) that "
            f"rules give different LoRA settings: {sorted(map(str, settings))}",
            where=weight, fix="one weight gets one LoRA: make the rules give its sites the same r/alpha/dropout")
    (chosen,) = settings
    site = decisions[0].site
    if chosen.r > min(site.in_features, site.out_features):
        raise RuleError(
            f"r={chosen.r} is larger than min(in, out) = {min(site.in_features, site.out_features)} of weight "
            f"{weight!r} ({site.out_features}x{site.in_features}): the update would not be low-rank",
            where=site.name, fix=f"use r <= {min(site.in_features, site.out_features)} for this site")
    return chosen


def inject(gm: fx.GraphModule, decisions: list[Decision], state: LoraState) -> PassResult:
    """Add LoRA branches for the adapted decisions. Validates everything before changing the graph."""
    by_weight: dict[str, list[Decision]] = {}
    for d in decisions:
        if d.adapted:
            by_weight.setdefault(d.site.weight, []).append(d)
    settings = {w: check_settings(w, ds) for w, ds in by_weight.items()}  # raises before any change

    container = nn.ModuleDict()
    gm.add_module(CONTAINER, container)
    nodes = {n.name: n for n in gm.graph.nodes}
    changes = []
    for weight, ds in by_weight.items():
        s, site = settings[weight], ds[0].site
        base_w = gm.get_parameter(weight)
        key = adapter_key(weight, set(container.keys()))
        lora_dtype = base_w.dtype if base_w.dtype.itemsize >= 4 else torch.float32
        container[key] = LoraLinear(site.in_features, site.out_features, r=s.r, alpha=s.alpha, dropout=s.dropout,
                                    scaling=s.scaling, init=s.init, weight_name=weight,
                                    weight_layout=site.weight_layout, dtype=lora_dtype, device=base_w.device)
        state.adapters[key] = weight
        for d in ds:
            base = nodes[d.site.node]
            x = base.args[d.site.input_arg]
            with gm.graph.inserting_after(base):
                branch = gm.graph.call_module(f"{CONTAINER}.{key}", (x,))
            with gm.graph.inserting_after(branch):
                add = gm.graph.call_function(operator.add, (base, branch))
            base.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
            branch.meta["lora_fx"], add.meta["lora_fx"] = (BRANCH, key), (ADD, key)
            for n in (branch, add):  # keep the provenance torch.export and the ONNX exporter read
                for k in ("nn_module_stack", "stack_trace"):
                    if k in base.meta:
                        n.meta[k] = base.meta[k]
        changes.append(f"{weight}: LoRA r={s.r} alpha={s.alpha:g} at {[d.site.node for d in ds]}")
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(by_weight), changes)


def lora_state(gm) -> LoraState | None:
    meta = getattr(gm, "meta", None)
    return meta.get("lora_fx") if isinstance(meta, dict) else None


def new_state(gm: fx.GraphModule, frontend: str, sites: list[Site], decisions: list[Decision]) -> LoraState:
    return LoraState(frontend=frontend, original_graph=graph_signature(gm.graph), sites=sites, decisions=decisions)
