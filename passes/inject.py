"""Inject pass: add a LoRA branch beside each chosen site, leaving the base node untouched.

    y = linear(x, W0, b)                y = linear(x, W0, b)
    z = relu(y)           becomes       d = lora_fx.<key>(x)      # dropout -> A -> B -> scale
                                        y2 = add(y, d)
                                        z = relu(y2)

One branch module per weight (lora_fx.site_kinds builds it for the site's kind; a weight used at several sites gets
one LoRA, called at each). The LoRA modules live
under the GraphModule's `lora_fx` ModuleDict, keyed by the weight's name with dots as underscores.
"""

from __future__ import annotations

import operator
import re
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lora_fx.errors import RuleError
from lora_fx.passes.match import node_input
from lora_fx.passes.infra import PassResult, graph_signature, preserve_on_deepcopy
from lora_fx.rules import Decision, LoraSettings
from lora_fx.site import Site
from lora_fx.site_kinds import kind_of

CONTAINER = "lora_fx"  # name of the ModuleDict that holds the default adapter's LoRA modules
DEFAULT = "default"  # the adapter adapt creates; others live in ModuleDicts named lora_fx_<name>
BRANCH, ADD = "branch", "add"  # node.meta["lora_fx"] tags that the fold pass removes


def container_name(adapter: str) -> str:
    return CONTAINER if adapter == DEFAULT else f"{CONTAINER}_{adapter}"


@dataclass
class LoraState:
    """What adapt records on the GraphModule (gm.meta["lora_fx"]) so fold can undo it exactly."""

    frontend: str
    original_graph: list  # graph_signature of the traced graph before injection
    sites: list[Site]  # every candidate site found by the match pass
    decisions: list[Decision]
    adapters: dict[str, dict[str, str]] = field(default_factory=dict)  # adapter name -> {LoRA key: weight name}
    untied: set[str] = field(default_factory=set)  # tied weights the user chose to untie at fold
    merged: list[str] = field(default_factory=list)  # adapters merged in place by merge_adapter, in order
    originals: dict[str, "torch.Tensor"] = field(default_factory=dict)  # exact W0 kept by merge_adapter
    rules: dict[str, Any] = field(default_factory=dict)  # adapter name -> the rules it was given (None: every site)
    defaults: dict[str, Any] = field(default_factory=dict)  # adapter name -> its LoraSettings defaults

    def containers(self, gm: fx.GraphModule) -> dict[str, nn.ModuleDict]:
        """{adapter name: its ModuleDict of LoRA branch modules} in the order the adapters were added."""
        return {name: getattr(gm, container_name(name)) for name in self.adapters}


def adapter_key(weight: str, taken: set[str], suffix: str = "") -> str:
    """'layers.0.attn.q.weight' -> 'layers_0_attn_q' (+ '_' + suffix); unique within `taken`."""
    base = re.sub(r"\W", "_", re.sub(r"\.weight$", "", weight)) or "weight"
    base = f"{base}_{suffix}" if suffix else base
    key, i = base, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    return key


def check_settings(weight: str, decisions: list[Decision]) -> LoraSettings:
    """One LoRA per weight (or per slice of a packed weight): its sites must agree on the settings."""
    settings = {d.settings for d in decisions}
    if len(settings) > 1:
        raise RuleError(
            f"weight {weight!r} is used at {len(decisions)} sites ({[d.site.node for d in decisions]}) that "
            f"rules give different LoRA settings: {sorted(map(str, settings))}",
            where=weight, fix="one weight gets one LoRA: make the rules give its sites the same r/alpha/dropout")
    (chosen,) = settings
    return chosen


def _units(decisions: list[Decision]) -> dict[tuple, list[Decision]]:
    """Group adapted decisions into LoRA units: (weight, role, rows) -> decisions. A packed weight selected by
    role gives one unit per role slice (loralib's MergedLinear); any other weight one unit. A site that reads a row
    slice of its weight (Site.weight_rows) gets a unit on those rows; rows are always rows of the weight."""
    units: dict[tuple, list[Decision]] = {}
    for d in decisions:
        if not d.adapted:
            continue
        offset = d.site.weight_rows
        for role, ranges in d.rows or ((None, ()),):
            if offset is not None:
                ranges = tuple((offset[0] + a, offset[0] + b) for a, b in ranges) or (offset,)
            units.setdefault((d.site.weight, role, tuple(ranges)), []).append(d)
    return units


def inject(gm: fx.GraphModule, decisions: list[Decision], state: LoraState, adapter: str = DEFAULT) -> PassResult:
    """Add LoRA branches for the adapted decisions. Validates everything before changing the graph.

    Another adapter on an already adapted graph adds its own branches beside the same base nodes
    (y' = add(add(y, branch_2), branch_1)); fold removes them all."""
    if not isinstance(adapter, str) or not adapter.isidentifier() or adapter in state.adapters:
        raise RuleError(f"adapter name {adapter!r} is taken or not an identifier", where="adapter",
                        fix=f"use a new name made of letters, digits and _ (taken: {sorted(state.adapters)})")
    units = _units(decisions)
    settings = {u: check_settings(u[0], ds) for u, ds in units.items()}  # raises before any change

    container = nn.ModuleDict()
    gm.add_module(container_name(adapter), container)
    state.adapters[adapter] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    changes = []
    for unit, ds in units.items():
        (weight, role, rows), s, site = unit, settings[unit], ds[0].site
        suffix = role.rpartition(".")[2] if role else (f"rows{rows[0][0]}" if site.weight_rows is not None else "")
        key = adapter_key(weight, set(container.keys()), suffix=suffix)
        container[key] = kind_of(site).build(site, s, gm.get_parameter(weight), rows)
        container[key].roles = ds[0].roles  # what selected it, for adapter files (lora_fx.adapter_file)
        state.adapters[adapter][key] = weight
        for d in ds:
            base = nodes[d.site.node]
            x = node_input(base, d.site.input_arg)
            with gm.graph.inserting_after(base):
                branch = gm.graph.call_module(f"{container_name(adapter)}.{key}", (x,))
            with gm.graph.inserting_after(branch):
                add = gm.graph.call_function(operator.add, (base, branch))
            base.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
            branch.meta["lora_fx"], add.meta["lora_fx"] = (BRANCH, adapter, key), (ADD, adapter, key)
            for n in (branch, add):  # keep the provenance torch.export and the ONNX exporter read
                for k in ("nn_module_stack", "stack_trace"):
                    if k in base.meta:
                        n.meta[k] = base.meta[k]
            branch.meta["nn_module_stack"] = _inside(base.meta.get("nn_module_stack"), branch.target,
                                                     type(container[key]))
        changes.append(f"{weight}{f' ({role} rows)' if role else ''}: LoRA {adapter!r} r={s.r} alpha={s.alpha:g} at {[d.site.node for d in ds]}")
    container.train(gm.training)  # new modules start in training mode: an eval-mode model must not drop out
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(units), changes)


def _inside(stack: dict | None, path: str, cls: type) -> dict:
    """The base node's module stack with the LoRA module innermost: an unmerged ONNX export then names the branch's
    nodes after it (lora_fx.fold_onnx finds every leftover branch by that), while layer boundaries stay."""
    stack = dict(stack or {})
    as_string = any(isinstance(v[1], str) for v in stack.values())
    stack[path] = (path, f"{cls.__module__}.{cls.__qualname__}" if as_string else cls)
    return stack


def keep_base_in_eval(gm: fx.GraphModule) -> None:
    """Make the base part of `gm` run as at inference whatever .train()/.eval() say; only LoRA branches follow.

    Why: torch.export bakes the base's eval mode into its graph, so this is the one behaviour both front ends can
    share; the base is frozen, so its BatchNorm statistics must not drift and its dropout has nothing to
    regularise; and the user's model, whose tensors gm shares, must not change mode or statistics (both front ends
    give gm its own module objects: trace_fx and clone_graph_module)."""
    for module in gm.modules():
        module.training = False
    preserve_on_deepcopy(gm, "train", types.MethodType(_train_lora_branches, gm))


def _train_lora_branches(self: fx.GraphModule, mode: bool = True) -> fx.GraphModule:
    """nn.Module.train for an adapted GraphModule: sets self.training and the LoRA containers' mode only."""
    if not isinstance(mode, bool):
        raise ValueError("training mode is expected to be boolean")
    self.training = mode
    for name, child in self.named_children():
        if name == CONTAINER or name.startswith(CONTAINER + "_"):
            child.train(mode)
    return self


def lora_state(gm) -> LoraState | None:
    meta = getattr(gm, "meta", None)
    return meta.get("lora_fx") if isinstance(meta, dict) else None


def new_state(gm: fx.GraphModule, frontend: str, sites: list[Site], decisions: list[Decision]) -> LoraState:
    return LoraState(frontend=frontend, original_graph=graph_signature(gm.graph), sites=sites, decisions=decisions)
