"""Inject pass: add a LoRA branch beside each site of an adapted weight, leaving the base node untouched.

    y = linear(x, W0, b)                y = linear(x, W0, b)
    z = relu(y)           becomes       d = lora_fx.<key>(x)      # dropout -> A -> B -> scale
                                        y2 = add(y, d)
                                        z = relu(y2)

Two steps, because one adapted model captures many graphs (one per call signature) that must train the same LoRA:
  * `build_branches` makes the branch modules once, from the plan's decisions: one per weight, or per role slice
    of a packed weight (lora_fx.site_kinds builds the module for the site's kind), keyed by the weight's name
    with dots as underscores, in a ModuleDict named after the adapter (lora_fx.state.container_name);
  * `inject` places those modules in one graph: every site of a weight that has a LoRA gets a branch (one LoRA per
    weight: fold writes W0 + delta into the one tensor every site reads). The graph holds the same ModuleDict.
"""

from __future__ import annotations

import operator
import re

from torch import fx, nn

from lora_fx.errors import InputError, RuleError
from lora_fx.passes.infra import PassResult
from lora_fx.passes.match import node_input
from lora_fx.rules import Decision, LoraSettings
from lora_fx.site import Site
from lora_fx.site_kinds import kind_of
from lora_fx.state import ADD, BRANCH, container_name


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


def build_branches(decisions: list[Decision], weights: nn.Module) -> tuple[nn.ModuleDict, list[str]]:
    """The branch modules for the adapted decisions (settings checked for every unit before any is made), and a
    line per LoRA. `weights` owns the base weights (their dtype and device)."""
    units = _units(decisions)
    settings = {u: check_settings(u[0], ds) for u, ds in units.items()}  # raises before anything is made
    container, changes = nn.ModuleDict(), []
    for unit, ds in units.items():
        (weight, role, rows), s, site = unit, settings[unit], ds[0].site
        suffix = role.rpartition(".")[2] if role else (f"rows{rows[0][0]}" if site.weight_rows is not None else "")
        key = adapter_key(weight, set(container.keys()), suffix=suffix)
        container[key] = kind_of(site).build(site, s, weights.get_parameter(weight), rows)
        container[key].roles = ds[0].roles  # what selected it, for adapter files (lora_fx.adapter_file)
        changes.append(f"{weight}{f' ({role} rows)' if role else ''}: LoRA r={s.r} alpha={s.alpha:g}")
    return container, changes


def placements(sites: list[Site], container: nn.ModuleDict) -> list[tuple[Site, str]]:
    """(site, key) for every site of a weight that has a LoRA in `container`: each of the weight's LoRAs at each
    site reading the rows it was made for. A site of another kind than its weight's LoRA (a weight the plan adapted
    as a linear, read here by an embedding) cannot carry it, and fold would change it anyway: InputError."""
    by_weight: dict[tuple, list[str]] = {}
    for key, lora in container.items():
        by_weight.setdefault((lora.weight_name, lora.output_rows), []).append(key)
    out = []
    for site in sites:
        for key in by_weight.get((site.weight, site.weight_rows), ()):
            if not isinstance(container[key], kind_of(site).branch):
                raise InputError(
                    f"this call reads weight {site.weight!r} at a {kind_of(site).name} site ({site.node}), but its "
                    f"LoRA is a {type(container[key]).__name__}: fold would change that site too",
                    where=site.name, fix="exclude this weight from the rules, or call the model as it was traced")
            out.append((site, key))
    return out


def inject(gm: fx.GraphModule, adapter: str, container: nn.ModuleDict,
           where: list[tuple[Site, str]]) -> PassResult:
    """Put `container` in `gm` (as its child container_name(adapter)) and a branch beside each (site, key) of
    `where`. Another adapter on an already adapted graph adds its own branches beside the same base nodes
    (y' = add(add(y, branch_2), branch_1)); fold removes them all."""
    gm.add_module(container_name(adapter), container)
    nodes = {n.name: n for n in gm.graph.nodes}
    for site, key in where:
        base = nodes[site.node]
        x = node_input(base, site.input_arg)
        extra, kwargs = kind_of(site).branch_inputs(site, base)  # an expert branch also takes the routing
        with gm.graph.inserting_after(base):
            branch = gm.graph.call_module(f"{container_name(adapter)}.{key}", (x, *extra), kwargs)
        with gm.graph.inserting_after(branch):
            add = gm.graph.call_function(operator.add, (base, branch))
        branch.meta["lora_fx"], add.meta["lora_fx"] = (BRANCH, adapter, key), (ADD, adapter, key)
        # every branch (this one, and another adapter's) may read the base output itself, e.g. for its dtype
        base.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add and not _is_branch(user))
        for n in (branch, add):  # keep the provenance torch.export and the ONNX exporter read
            for k in ("nn_module_stack", "stack_trace"):
                if k in base.meta:
                    n.meta[k] = base.meta[k]
        branch.meta["nn_module_stack"] = _inside(base.meta.get("nn_module_stack"), branch.target,
                                                 type(container[key]))
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(where), [f"{adapter}: {key} at {site.node}" for site, key in where])


def _is_branch(node: fx.Node) -> bool:
    return (node.meta.get("lora_fx") or (None,))[0] == BRANCH


def check_adapter_name(adapter: str, taken: dict) -> None:
    if not isinstance(adapter, str) or not adapter.isidentifier() or adapter in taken or adapter == "base":
        raise RuleError(f"adapter name {adapter!r} is taken or not an identifier", where="adapter",
                        fix=f"use a new name made of letters, digits and _ (taken: {sorted(taken)}; 'base' "
                             f"is lora_fx's own)")


def _inside(stack: dict | None, path: str, cls: type) -> dict:
    """The base node's module stack with the LoRA module innermost: an unmerged ONNX export then names the branch's
    nodes after it (lora_fx.fold_onnx finds every leftover branch by that), while layer boundaries stay."""
    stack = dict(stack or {})
    as_string = any(isinstance(v[1], str) for v in stack.values())
    stack[path] = (path, f"{cls.__module__}.{cls.__qualname__}" if as_string else cls)
    return stack
