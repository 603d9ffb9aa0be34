"""The public calls: adapt, lora_parameters, fold, plan.

    adapted = lora_fx.adapt(model, rules, example_inputs=(x,))   # trace -> match -> decide -> inject
    opt = torch.optim.AdamW(lora_fx.lora_parameters(adapted))     # only A and B train
    merged = lora_fx.fold(adapted)                                # original graph, W0 + (alpha/r)·B·A
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn

from lora_fx.errors import FoldError, InputError, NoSitesError, RuleError, warn
from lora_fx.passes import fold as fold_pass
from lora_fx.passes import inject as inject_pass
from lora_fx.passes.causal_attention import use_causal_attention
from lora_fx.passes.split_layers import LayerView, split_layers as split_pass
from lora_fx.passes.infra import dtensor_type
from lora_fx.passes.match import find_sites
from lora_fx.passes.roles import with_roles
from lora_fx.passes.trace import trace
from lora_fx.plan import Plan, apply_policies, tied_weights
from lora_fx.rollback import unchanged_on_error
from lora_fx.rules import Decision, LoraSettings, Rule, coerce_rules, decide, explain_unused, unused_rules


def _defaults(r: int, alpha: float, dropout: float) -> LoraSettings:
    Rule(r=r, alpha=alpha, dropout=dropout)  # validates the defaults the same way as a rule's fields
    return LoraSettings(r=r, alpha=float(alpha), dropout=float(dropout))


def _trace_and_decide(model, rules, example_inputs, example_kwargs, frontend, r, alpha, dropout, trace_options,
                      untie: bool = False, fit_rank: bool = True):
    rules = coerce_rules(rules)
    defaults = _defaults(r, alpha, dropout)
    traced = trace(model, example_inputs, example_kwargs, frontend=frontend, **trace_options)
    sites = with_roles(traced.graph_module, find_sites(traced.graph_module, model),
                       example_inputs=example_inputs, example_kwargs=example_kwargs)
    decisions = apply_policies(decide(sites, rules, defaults, fit_rank=fit_rank), tied=tied_weights(model),
                               rules_given=rules is not None, untie=untie, frontend=traced.frontend)
    return traced, rules, sites, decisions


def plan(model: nn.Module, rules: Rule | Iterable[Rule] | None = None, *, example_inputs: tuple | None = None,
         example_kwargs: dict | None = None, frontend: str = "auto", r: int = 8, alpha: float = 16.0,
         dropout: float = 0.0, **trace_options: Any) -> Plan:
    """A dry run: every candidate site, the rule that took it (or why none did), r and parameters added.

    Changes nothing; `adapt` uses the same matching."""
    traced, rules, sites, decisions = _trace_and_decide(model, rules, example_inputs, example_kwargs, frontend,
                                                        r, alpha, dropout, trace_options)
    return Plan(frontend=traced.frontend, rules=rules, decisions=decisions)


def adapt(model: nn.Module, rules: Rule | Iterable[Rule] | None = None, *, example_inputs: tuple | None = None,
          example_kwargs: dict | None = None, frontend: str = "auto", r: int = 8, alpha: float = 16.0,
          dropout: float = 0.0, untie: bool = False, strict: bool = False, causal_attention: bool = True,
          **trace_options: Any) -> fx.GraphModule:
    """Trace `model` and add LoRA beside every site the rules choose (rules=None: every linear-like site).

    Returns a GraphModule that shares the model's weights (no copies). Base parameters are frozen
    (requires_grad=False); nothing else in the model changes. The base runs as in eval mode (BatchNorm statistics
    fixed, its dropout off) in both front ends; .train()/.eval() switch only the LoRA branches' dropout.
    r/alpha/dropout are the defaults for rule fields left unset. r larger than a site's min(in, out) (a 2-label
    classifier head) is capped to it: silently for the defaults, with a warning for a rule's r (lora_fx.plan shows
    both). untie=True lets a rule adapt a weight tied to another (e.g. an lm_head tied to the embedding):
    fold then gives the adapted use its own copy. A rule that decides no site, or whose r is capped, is a warning,
    or a RuleError with strict=True. causal_attention=True lets attention whose traced mask is provably plain
    causal run as SDPA(is_causal=True) while training (the flash kernel; torch.export graphs only; fold restores
    the mask: passes/causal_attention.py). trace_options: leaf_modules=, open_modules=, concrete_args=.
    On any error the model is left exactly as it was.
    """
    return adapt_model(model, rules, example_inputs=example_inputs, example_kwargs=example_kwargs, frontend=frontend,
                       r=r, alpha=alpha, dropout=dropout, untie=untie, strict=strict,
                       causal_attention=causal_attention, **trace_options)


def adapt_model(model: nn.Module, rules: Any, *, example_inputs: tuple | None = None,
                example_kwargs: dict | None = None, frontend: str = "auto", r: int = 8, alpha: float = 16.0,
                dropout: float = 0.0, untie: bool = False, strict: bool = False, causal_attention: bool = True,
                fit_rank: bool = True, **trace_options: Any) -> fx.GraphModule:
    """adapt, for lora_fx's own callers too: adapter loaders pass fit_rank=False, since a file's tensors fix r."""
    with unchanged_on_error(model):
        traced, rules, sites, decisions = _trace_and_decide(model, rules, example_inputs, example_kwargs, frontend,
                                                            r, alpha, dropout, trace_options, untie, fit_rank)
        _check_decisions(model, rules, sites, decisions, strict)
        gm = traced.graph_module
        mode = model.training
        inject_pass.keep_base_in_eval(gm)
        state = inject_pass.new_state(gm, traced.frontend, sites, decisions)
        state.rules[inject_pass.DEFAULT], state.defaults[inject_pass.DEFAULT] = rules, _defaults(r, alpha, dropout)
        inject_pass.inject(gm, decisions, state)  # validates per-weight settings before touching the graph
        if causal_attention and traced.frontend == "export":
            use_causal_attention(gm)
        state.untied = {d.site.weight for d in decisions if d.adapted and d.site.weight in tied_weights(model)}
        gm.meta["lora_fx"] = state
        for name, p in gm.named_parameters():  # freeze the base: every parameter outside the LoRA container
            if not name.startswith(inject_pass.CONTAINER + "."):
                p.requires_grad_(False)
        gm.train(mode)  # the user's mode, for the LoRA branches; the base stays in eval (keep_base_in_eval)
        return gm


def _check_decisions(model: nn.Module, rules: list[Rule] | None, sites: list, decisions: list[Decision],
                     strict: bool) -> None:
    """Refuse a plan that adapts nothing; warn (strict: raise) about rules that decide nothing or get a capped r."""
    if not any(d.adapted for d in decisions):
        candidates = [s.name for s in sites]
        if not sites:
            raise NoSitesError("the model has no linear-like site (nn.Linear, F.linear, matmul on a parameter)",
                               where=type(model).__name__,
                               fix="check that the layers are not hidden in leaf modules (open_modules=[...]) "
                                   "or try frontend='export'")
        raise NoSitesError(
            f"no rule matched any of the {len(sites)} candidate sites: {candidates[:20]}"
            + (" ..." if len(candidates) > 20 else ""),
            where=", ".join(r.describe() for r in rules or []),
            fix="change the rules to name one of the candidates above (lora_fx.plan lists them with reasons)")
    problems = [(f"rules[{i}]", f"rule {i} {rules[i].describe()} decides no site: {explain_unused(rules[i], sites)}",
                 "fix or remove the rule (lora_fx.plan lists the sites)") for i in unused_rules(rules, decisions)]
    capped = [d for d in decisions if d.requested_r and rules is not None and rules[d.rule_index].r is not None]
    for i in sorted({d.rule_index for d in capped}):
        names = sorted({d.site.name + (f" [{d.slice_role}]" if d.slice_role else "") + f" (r={d.settings.r})"
                        for d in capped if d.rule_index == i})
        problems.append((f"rules[{i}]", f"rule {i} {rules[i].describe()} asks for r={rules[i].r}, more than "
                                        f"min(in, out) of {names[:10]}: r is capped there",
                         "lower r, or exclude those sites with an earlier Rule(..., exclude=True)"))
    refused = [d for d in decisions if d.refusal]
    if refused:
        problems.append((refused[0].site.name, f"{len(refused)} selected site(s) cannot take a LoRA and are left "
                                               f"without: " + "; ".join(f"{d.site.name}: {d.refusal}"
                                                                       for d in refused[:5]),
                         "exclude them with an earlier Rule(..., exclude=True), or select other sites"))
    for where, message, fix in problems:
        if strict:
            raise RuleError(message, where=where, fix=fix)
        warn(f"lora_fx: {message}")


def lora_parameters(adapted: nn.Module, adapter: str | None = None) -> Iterator[nn.Parameter]:
    """The trainable LoRA parameters (every A and B) of an adapted module: of one adapter, or of every enabled one."""
    _container(adapted)
    for name, container in inject_pass.lora_state(adapted).containers(adapted).items():
        if adapter is not None and name != adapter:
            continue
        for lora in container.values():
            if adapter is not None or lora.enabled:
                yield lora.lora_A
                yield lora.lora_B


def lora_state_dict(adapted: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, named as in adapted.state_dict()."""
    _container(adapted)
    prefixes = tuple(inject_pass.container_name(a) + "." for a in inject_pass.lora_state(adapted).adapters)
    return {k: v for k, v in adapted.state_dict().items() if k.startswith(prefixes)}


def add_adapter(adapted: fx.GraphModule, name: str, rules: Rule | Iterable[Rule] | None = None, *, r: int = 8,
                alpha: float = 16.0, dropout: float = 0.0) -> fx.GraphModule:
    """Add another named adapter beside the existing ones, on sites chosen by its own rules (in place)."""
    _container(adapted)
    state = inject_pass.lora_state(adapted)
    rules = coerce_rules(rules)
    tied = {w: twins for w, twins in tied_weights(adapted).items() if w not in state.untied}
    decisions = apply_policies(decide(state.sites, rules, _defaults(r, alpha, dropout)), tied=tied,
                               rules_given=rules is not None, untie=False, frontend=state.frontend)
    if not any(d.adapted for d in decisions):
        raise NoSitesError(f"the rules of adapter {name!r} match none of the sites "
                           f"{[s.name for s in state.sites][:20]}", where=name,
                           fix="change the rules (lora_fx.plan lists the sites)")
    inject_pass.inject(adapted, decisions, state, adapter=name)
    state.rules[name], state.defaults[name] = rules, _defaults(r, alpha, dropout)
    return adapted


def set_adapter(adapted: fx.GraphModule, names: str | Iterable[str] | None) -> None:
    """Enable exactly the named adapters (None: none); the others add nothing until enabled again."""
    _container(adapted)
    names = {names} if isinstance(names, str) else set(names or ())
    containers = inject_pass.lora_state(adapted).containers(adapted)
    unknown = names - set(containers)
    if unknown:
        raise InputError(f"no adapter named {sorted(unknown)}", where=type(adapted).__name__,
                         fix=f"use one of {sorted(containers)}")
    for name, container in containers.items():
        for lora in container.values():
            lora.enabled = name in names


def active_adapters(adapted: fx.GraphModule) -> list[str]:
    _container(adapted)
    return [name for name, c in inject_pass.lora_state(adapted).containers(adapted).items()
            if any(lora.enabled for lora in c.values())]


@contextlib.contextmanager
def disable_adapters(adapted: fx.GraphModule):
    """Inside the block the adapted module computes the base model's output."""
    before = active_adapters(adapted)
    set_adapter(adapted, None)
    try:
        yield adapted
    finally:
        set_adapter(adapted, before)


def merge_adapter(adapted: fx.GraphModule, name: str = inject_pass.DEFAULT, *, keep_original: bool = True) -> None:
    """Fold one adapter into W0 in place, keeping the graph adapted so unmerge_adapter can take it out again.

    keep_original=True (default) keeps an exact copy of every W0 it changes, so unmerging is bit-exact; it costs
    one copy of those weights in memory. With False, unmerging subtracts the delta (within rounding error)."""
    _container(adapted)
    fold_pass.merge_adapter(adapted, name, keep_original=keep_original)


def unmerge_adapter(adapted: fx.GraphModule) -> None:
    """Take the merged adapter back out of W0 and re-enable its branches."""
    _container(adapted)
    fold_pass.unmerge_adapter(adapted)


def fold(adapted: fx.GraphModule, *, inplace: bool = False, adapters: str | Iterable[str] | None = None,
         accumulate_dtype: torch.dtype | None = None) -> fx.GraphModule:
    """W0 + (alpha/r)·B·A accumulated in fp32 (fp64 for fp32 weights) and rounded once; every LoRA node removed.

    The result's graph equals the traced original node for node and its parameters keep the model's names.
    inplace=False (default): a new module whose folded weights are new tensors; `adapted` and the user's model
    keep theirs, so training can go on. inplace=True: writes into W0 (shared with the user's model) to save memory.
    adapters: the adapter(s) to fold (default: every enabled one). accumulate_dtype overrides the accumulation.
    """
    _container(adapted)
    sharded = _sharded_parameters(adapted)
    if sharded:
        raise FoldError(f"the adapted module's parameters are sharded DTensors (FSDP2 fully_shard), e.g. {sharded[0]!r}: "
                        f"a fold needs whole weights", where="fold",
                        fix="gather first: {k: v.full_tensor() for k, v in adapted.state_dict().items()} on every "
                            "rank, load it into a plain lora_fx.adapt copy of the model, and fold that")
    if inject_pass.lora_state(adapted).merged:
        raise FoldError(f"adapter {inject_pass.lora_state(adapted).merged[-1]!r} is merged in place", where="fold",
                        fix="call lora_fx.unmerge_adapter(adapted) first, or fold with inplace=False after it")
    if isinstance(adapters, str):
        adapters = [adapters]
    if adapters is not None:
        unknown = set(adapters) - set(inject_pass.lora_state(adapted).adapters)
        if unknown:
            raise InputError(f"no adapter named {sorted(unknown)}", where="fold",
                             fix=f"use one of {sorted(inject_pass.lora_state(adapted).adapters)}")
    return fold_pass.fold(adapted, inplace=inplace, adapters=None if adapters is None else list(adapters),
                          accumulate_dtype=accumulate_dtype).graph_module


def split_layers(adapted: fx.GraphModule, *, checkpoint_every: int = 0, layers: str | None = None) -> LayerView:
    """A training view of `adapted` with one submodule per repeated layer (passes/split_layers.py): for
    per-layer FSDP2 (fully_shard each of view.layer_modules, then the view) and activation checkpointing
    (checkpoint_every=k: every k-th layer keeps only its inputs and recomputes the rest in the backward pass).

    layers: the module list to split at (default: the one with the most items, e.g. "model.layers"). The view
    computes the same values with the same parameters and module objects; train it, then fold, save and export
    `adapted` itself. Make it after add_adapter calls: it splits the graph as it is then (set_adapter and
    merge_adapter reach it)."""
    _container(adapted)
    return split_pass(adapted, checkpoint_every, layers).view


def checkpoint_layers(adapted: fx.GraphModule, *, every: int = 1, layers: str | None = None) -> LayerView:
    """split_layers with every `every`-th layer under activation checkpointing: a training view that keeps fewer
    activations (memory saved and compute added both scale with the layers chosen)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise InputError(f"every must be a positive int, got {every!r}", where="every",
                         fix="every=1 checkpoints each layer, every=2 every other one")
    return split_layers(adapted, checkpoint_every=every, layers=layers)


def _sharded_parameters(module: nn.Module) -> list[str]:
    """Names of parameters that are DTensors (FSDP2's fully_shard makes every parameter one)."""
    dtensor = dtensor_type()
    return [name for name, p in module.named_parameters() if dtensor is not None and isinstance(p, dtensor)]


def _container(adapted: Any) -> nn.ModuleDict:
    if isinstance(adapted, LayerView):
        raise InputError("this is the layer view (split_layers / checkpoint_layers) of an adapted model, not the "
                         "adapted model",
                         where=type(adapted).__name__,
                         fix="pass the model it views: view.adapted (the one lora_fx.adapt returned)")
    if not isinstance(adapted, nn.Module):
        raise InputError(f"expected a module returned by lora_fx.adapt, got {type(adapted).__name__}",
                         where="adapted", fix="call lora_fx.adapt(model, ...) first")
    container = getattr(adapted, inject_pass.CONTAINER, None)
    if not isinstance(container, nn.ModuleDict) or inject_pass.lora_state(adapted) is None:
        raise FoldError(f"this {type(adapted).__name__} was not adapted by lora_fx (it has no LoRA modules)",
                        where=type(adapted).__name__, fix="pass the module that lora_fx.adapt returned")
    return container


def nearest_names(name: str, candidates: list[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.3)
