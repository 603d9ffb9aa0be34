"""The public calls: adapt, plan, fold, and what acts on an adapted model's LoRA.

    adapted = lora_fx.adapt(model, rules, example_inputs=(x,))   # the user's model, LoRA inside (lora_fx.adapted)
    opt = torch.optim.AdamW(lora_fx.trainable_parameters(adapted))  # A and B (and modules trained in full)
    merged = lora_fx.fold(adapted)                                # the user's class, W0 + (alpha/r)·B·A

adapt is a pipeline of passes (lora_fx/passes, one file a pass), read top to bottom in `adapt_model`:

    trace            the model's call -> GraphModule          (torch.fx symbolic tracing, or torch.export)
    match + roles    GraphModule -> [Site]                     (linear/conv/embedding sites, q/k/v/out/mlp roles)
    plan             sites + rules -> [Decision]               (first matching rule, then lora_fx.plan's policies)
    build branches   decisions -> the LoRA modules             (once per adapter, lora_fx.site_kinds)
    inject           GraphModule -> GraphModule                (a branch beside every site of an adapted weight)
    causal attention GraphModule -> GraphModule                (torch.export graphs: provably causal masks)

Later calls of the adapted model with another signature run `capture_call`: trace, match and inject again, into
the same LoRA modules.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn

from lora_fx import adapted as adapted_model
from lora_fx import quantize, submodule_calls
from lora_fx.errors import FoldError, InputError, NoSitesError, RuleError, warn
from lora_fx.passes import fold as fold_pass
from lora_fx.passes import inject as inject_pass
from lora_fx.passes.capture import call_key
from lora_fx.passes.causal_attention import use_causal_attention
from lora_fx.passes.infra import dtensor_type, graph_signature, set_parameter_copy_on_write
from lora_fx.passes.match import control_flow_weights, find_sites
from lora_fx.passes.roles import with_roles
from lora_fx.passes.split_layers import LayerView, split_layers as split_pass
from lora_fx.passes.trace import trace, trace_call
from lora_fx.plan import Plan, apply_policies, tied_weights
from lora_fx.rollback import unchanged_on_error
from lora_fx.rules import Decision, LoraSettings, Rule, coerce_rules, decide, explain_unused, unused_rules
from lora_fx.state import DEFAULT, LoraState, STATE_KEY, adapted_state, container_name

log = logging.getLogger("lora_fx")


def _defaults(r: int, alpha: float, dropout: float) -> LoraSettings:
    Rule(r=r, alpha=alpha, dropout=dropout)  # validates the defaults the same way as a rule's fields
    return LoraSettings(r=r, alpha=float(alpha), dropout=float(dropout))


# ---------------------------------------------------------------------------------------------------- planning
def _analyse(gm: fx.GraphModule, model: nn.Module, example_inputs, example_kwargs) -> list:
    """match + roles: every site of the graph, with the roles the graph gives it."""
    return with_roles(gm, find_sites(gm, model), example_inputs=example_inputs, example_kwargs=example_kwargs)


def _decide(model: nn.Module, sites: list, rules, defaults: LoraSettings, frontend: str, *, untie: bool = False,
            fit_rank: bool = True, full: tuple[str, ...] = ()) -> list[Decision]:
    """rules -> decisions -> the policies every plan obeys (lora_fx.plan); sites inside modules trained in full
    take no LoRA."""
    decisions = decide(sites, rules, defaults, fit_rank=fit_rank)
    decisions = [Decision(d.site, None, None, f"{d.site.module} is trained in full (modules_to_save)")
                 if any(d.site.module == m or d.site.module.startswith(m + ".") for m in full) else d
                 for d in decisions]
    return apply_policies(decisions, tied=tied_weights(model), rules_given=rules is not None, untie=untie,
                          frontend=frontend)


def plan(model: nn.Module, rules: Rule | Iterable[Rule] | None = None, *, example_inputs: tuple | None = None,
         example_kwargs: dict | None = None, frontend: str = "auto", r: int = 8, alpha: float = 16.0,
         dropout: float = 0.0, **trace_options: Any) -> Plan:
    """A dry run: every candidate site, the rule that took it (or why none did), r and parameters added.

    Changes nothing; `adapt` uses the same passes."""
    rules = coerce_rules(rules)
    traced = trace(model, example_inputs, example_kwargs, frontend=frontend, **trace_options)
    sites = _analyse(traced.graph_module, model, example_inputs, example_kwargs)
    decisions = _decide(model, sites, rules, _defaults(r, alpha, dropout), traced.frontend)
    return Plan(frontend=traced.frontend, rules=rules, decisions=decisions)


# ---------------------------------------------------------------------------------------------------- adapt
def adapt(model: nn.Module, rules: Rule | Iterable[Rule] | None = None, *, example_inputs: tuple | None = None,
          example_kwargs: dict | None = None, frontend: str = "auto", r: int = 8, alpha: float = 16.0,
          dropout: float = 0.0, modules_to_save: Iterable[str] = (), untie: bool = False, strict: bool = False,
          causal_attention: bool = True, **trace_options: Any) -> nn.Module:
    """The user's model with LoRA beside every site the rules choose (rules=None: every linear-like site).

    Returns a drop-in for `model` (lora_fx.adapted): an instance of its own class, sharing its modules and weights
    (no copies), that takes every call the original takes. Base parameters are frozen (requires_grad=False); their
    values change only in fold(inplace=True). Dropout follows train()/eval() as in the original; BatchNorm
    statistics stay frozen. r/alpha/dropout are the defaults for rule fields left unset. r larger than a site's
    min(in, out) (a 2-label classifier head) is capped to it: silently for the defaults, with a warning for a
    rule's r (lora_fx.plan shows both). modules_to_save: modules trained in full beside the LoRA (a new
    classifier head): the adapted model gets its own trainable copy, the user's model keeps the original. untie=True
    lets a rule adapt a weight tied to another (an lm_head tied to the embedding): fold then gives the adapted use
    its own copy. A rule that decides no site, or whose r is capped, is a warning, or a RuleError with strict=True.
    causal_attention=True lets attention whose traced mask is provably plain causal run as SDPA(is_causal=True)
    while training (torch.export graphs; passes/causal_attention.py). trace_options: leaf_modules=,
    open_modules=, concrete_args=. example_inputs / example_kwargs: one call of the model (torch.export needs it;
    other calls are captured when they come). On any error the model is left exactly as it was.
    """
    return adapt_model(model, rules, example_inputs=example_inputs, example_kwargs=example_kwargs, frontend=frontend,
                       r=r, alpha=alpha, dropout=dropout, modules_to_save=modules_to_save, untie=untie, strict=strict,
                       causal_attention=causal_attention, **trace_options)


def adapt_model(model: nn.Module, rules: Any, *, example_inputs: tuple | None = None,
                example_kwargs: dict | None = None, frontend: str = "auto", r: int = 8, alpha: float = 16.0,
                dropout: float = 0.0, modules_to_save: Iterable[str] = (), untie: bool = False, strict: bool = False,
                causal_attention: bool = True, fit_rank: bool = True, **trace_options: Any) -> nn.Module:
    """adapt, for lora_fx's own callers too: adapter loaders pass fit_rank=False, since a file's tensors fix r."""
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}", where="model",
                         fix="pass the model object itself (an nn.Module)")
    if adapted_model.is_adapted(model):
        raise InputError("this model was adapted already", where=type(model).__name__,
                         fix="add another adapter with lora_fx.add_adapter(adapted, name, rules), or adapt the "
                             "original model (lora_fx.fold gives back a plain one)")
    with unchanged_on_error(model):
        rules = coerce_rules(rules)
        defaults = _defaults(r, alpha, dropout)
        adapted = adapted_model.new_adapted(model, adapted_model.Calls(
            _forward_signature(model), "", dict(trace_options), causal_attention))
        full = _train_in_full(adapted, modules_to_save)
        core = adapted_model.core(adapted)
        with adapted_model.frozen_norms(core):
            traced = trace(core, example_inputs, example_kwargs, frontend=frontend, **trace_options)
        log.info("lora_fx: trace: %s", "; ".join(traced.changes))
        gm = traced.graph_module
        sites = _analyse(gm, core, example_inputs, example_kwargs)
        decisions = _decide(model, sites, rules, defaults, traced.frontend, untie=untie, fit_rank=fit_rank, full=full)
        seen = {s.weight for s in sites}
        hidden = {w: op for w, op in control_flow_weights(gm).items() if w not in seen}
        _check_decisions(model, rules, sites, decisions, strict, hidden)

        state = LoraState(traced.frontend, graph_signature(gm.graph), sites, decisions, modules_to_save=full)
        state.rules[DEFAULT], state.defaults[DEFAULT] = rules, defaults
        state.untied = {d.site.weight for d in decisions if d.adapted and d.site.weight in tied_weights(model)}
        _add_branches(adapted, state, DEFAULT, decisions)
        adapted.__dict__[STATE_KEY] = state
        calls = adapted.__dict__[adapted_model.CALLS]
        calls.frontend = traced.frontend
        entry = _finish_graph(adapted, gm, traced.spec, sites)
        calls.captures += 1
        have_inputs = example_inputs is not None or bool(example_kwargs)
        arguments = _bound(calls, example_inputs, example_kwargs) if have_inputs else {}
        entry.arguments, entry.training = arguments, adapted.training
        calls.add(call_key(arguments, adapted.training) or (("training", adapted.training),), entry)
        for p in model.parameters():  # freeze the base: the model's own tensors (adapted shares them)
            p.requires_grad_(False)
        for name in full:  # ...except the copies of the modules trained in full
            for p in adapted.get_submodule(name).parameters():
                p.requires_grad_(True)
        return adapted


def _forward_signature(model: nn.Module):
    import inspect

    return inspect.signature(type(model).forward).replace(
        parameters=list(inspect.signature(type(model).forward).parameters.values())[1:])


def _bound(calls, args, kwargs) -> dict:
    return calls.bind(tuple(args or ()) if not isinstance(args, torch.Tensor) else (args,), dict(kwargs or {}))


def _train_in_full(adapted: nn.Module, names: Iterable[str]) -> tuple[str, ...]:
    """Give each module trained in full its own copy of its parameters in the adapted model (the user's model keeps
    the originals); these copies train, and fold writes them into the merged model."""
    names = tuple([names] if isinstance(names, str) else names)
    known = [n for n, _ in adapted.named_modules() if n]
    for name in names:
        if not isinstance(name, str) or name not in known:
            near = difflib.get_close_matches(str(name), known, n=3, cutoff=0.3)
            raise InputError(f"modules_to_save names {name!r}, which is not a module of this "
                             f"{type(adapted).__name__}", where="modules_to_save",
                             fix=f"use module names as in model.named_modules(){f', e.g. {near}' if near else ''}")
        for pname, p in list(adapted.get_submodule(name).named_parameters()):
            set_parameter_copy_on_write(adapted, f"{name}.{pname}", p.detach().clone())
    return names


def _add_branches(owner: nn.Module, state: LoraState, adapter: str, decisions: list[Decision]) -> None:
    """build branches: the adapter's LoRA modules, as a ModuleDict child of the adapted model."""
    inject_pass.check_adapter_name(adapter, state.adapters)
    container, changes = inject_pass.build_branches(decisions, owner)
    log.info("lora_fx: adapter %r: %s", adapter, "; ".join(changes))
    container.train(owner.training)  # new modules start in training mode: an eval-mode model must not drop out
    owner.add_module(container_name(adapter), container)
    submodule_calls.attach(owner, container)  # direct calls of its modules (adapted.model(...)) carry the LoRA too
    state.adapters[adapter] = {key: lora.weight_name for key, lora in container.items()}


def _finish_graph(adapted: nn.Module, gm: fx.GraphModule, spec, sites: list) -> adapted_model.Entry:
    """inject (every adapter's branches) and causal attention on one captured graph."""
    state: LoraState = adapted.__dict__[STATE_KEY]
    original = graph_signature(gm.graph)
    for name, container in state.containers(adapted).items():
        inject_pass.inject(gm, name, container, inject_pass.placements(sites, container))
    if state.frontend == "export" and adapted.__dict__[adapted_model.CALLS].causal_attention:
        use_causal_attention(gm)
    quantize.finish_graph(gm, adapted, state, sites)  # reads of a quantized base go to its quantized matmuls
    gm.meta["lora_fx"] = state.for_graph(original, sites, state.decisions)
    return adapted_model.Entry(gm, spec, training=gm.training)


@torch._dynamo.disable  # under torch.compile the capture runs eagerly; the graph it makes is what dynamo compiles
def capture_call(adapted: nn.Module, arguments: dict[str, Any]) -> adapted_model.Entry:
    """A call no captured graph takes: trace it, match its sites and inject the adapted model's LoRA modules."""
    calls = adapted.__dict__[adapted_model.CALLS]
    devices = sorted({p.device.index or 0 for p in adapted.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # tracing draws random numbers: the caller's stream stays as it was
        with quantize.traceable(adapted, adapted.__dict__[STATE_KEY]):
            core = adapted_model.core(adapted)  # made here: a copy of the model's own tensors, stand-ins included
            gm, spec = trace_call(core, arguments, calls.frontend, calls.trace_options)
        sites = find_sites(gm, core)
        entry = _finish_graph(adapted, gm, spec, sites)
    _warn_of_sites_without_lora(adapted, sites, arguments)
    entry.arguments, entry.training = arguments, adapted.training
    calls.captures += 1
    log.info("lora_fx: captured %s call %s (%d graphs)", type(adapted).__name__, sorted(arguments), calls.captures)
    return entry


def _warn_of_sites_without_lora(adapted: nn.Module, sites: list, arguments: dict[str, Any]) -> None:
    """A later call may read weights the example call never did (another branch, other keyword arguments). LoRA
    modules are made once, at adapt, so that an optimizer built then holds them all: a weight first read here gets
    none even where an adapter's rules select it. Say so instead of training without it."""
    state: LoraState = adapted.__dict__[STATE_KEY]
    known = {s.weight for s in state.sites}
    new = [s for s in sites if s.weight not in known]
    for name in state.adapters:
        if not new or name not in state.rules:
            continue
        decisions = apply_policies(decide(new, state.rules[name], state.defaults[name]), tied={},
                                   rules_given=state.rules[name] is not None, untie=False, frontend=state.frontend)
        missed = sorted({d.site.weight for d in decisions if d.adapted})
        if missed:
            warn(f"lora_fx: this call ({sorted(arguments)}) reads weights the example call at adapt did not: "
                 f"{missed[:10]}{' ...' if len(missed) > 10 else ''}. Adapter {name!r}'s rules select them, but "
                 f"they have no LoRA (LoRA modules are made at adapt, from the example call), so here they run "
                 f"as the frozen base. Fix: give lora_fx.adapt example_inputs/example_kwargs that reach them, or "
                 f"exclude them with Rule(name=..., exclude=True) to silence this.")


def _check_decisions(model: nn.Module, rules: list[Rule] | None, sites: list, decisions: list[Decision],
                     strict: bool, hidden: dict[str, str] | None = None) -> None:
    """Refuse a plan that adapts nothing; warn (strict: raise) about rules that decide nothing or get a capped r,
    and about weights only control flow reads (`hidden`: {weight: op}, which no pass rewrites)."""
    hidden = hidden or {}
    inside = (f"{len(hidden)} weight(s) are read only inside control flow ({sorted(set(hidden.values()))}), whose "
              f"subgraphs lora_fx does not rewrite: {sorted(hidden)[:10]}")
    inside_fix = ("compute the branches outside the control flow (both, then torch.where on the condition) so their "
                  "linears are in the graph, or adapt the layers outside it")
    if not any(d.adapted for d in decisions):
        candidates = list(dict.fromkeys(s.name for s in sites))  # a weight read twice (tied, reused) once
        if not sites:
            raise NoSitesError(
                "the model has no linear-like site (nn.Linear, F.linear, matmul on a parameter)"
                + (f": {inside}" if hidden else ""), where=type(model).__name__,
                fix=inside_fix if hidden else "check that the layers are not hidden in leaf modules "
                                              "(open_modules=[...]) or try frontend='export'")
        chosen = ", ".join(r.describe() for r in rules) if rules else "rules=None (every linear-like site)"
        refused = [d for d in decisions if d.refusal]
        if refused:
            raise NoSitesError(
                f"the rules select {len(refused)} site(s), but none can take a LoRA: "
                + "; ".join(f"{d.site.name}: {d.refusal}" for d in refused[:5]) + (" ..." if len(refused) > 5 else ""),
                where=chosen, fix="select other sites (lora_fx.plan lists every candidate with the reason it is "
                                  "left out)")
        raise NoSitesError(
            f"no rule matched any of the {len(candidates)} candidate sites: {candidates[:20]}"
            + (" ..." if len(candidates) > 20 else "") + (f"; {inside}" if hidden else ""),
            where=chosen,
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
    for name, why in Plan("", rules, decisions).whole_weight_notes().items():
        problems.append((name, why, "select the packed weight by name to adapt it whole on purpose, or exclude it "
                                    "with an earlier Rule(name=..., exclude=True)"))
    refused = [d for d in decisions if d.refusal]
    if refused:
        problems.append((refused[0].site.name, f"{len(refused)} selected site(s) cannot take a LoRA and are left "
                                               f"without: " + "; ".join(f"{d.site.name}: {d.refusal}"
                                                                       for d in refused[:5]),
                         "exclude them with an earlier Rule(..., exclude=True), or select other sites"))
    if hidden:
        problems.append((sorted(hidden)[0], f"{inside}; they get no LoRA", inside_fix))
    for where, message, fix in problems:
        if strict:
            raise RuleError(message, where=where, fix=fix)
        warn(f"lora_fx: {message}")


# ---------------------------------------------------------------------------------------------------- the LoRA
def lora_parameters(adapted: nn.Module, adapter: str | None = None) -> Iterator[nn.Parameter]:
    """The LoRA parameters (every A and B) of an adapted model: of one adapter, or of every enabled one. Modules
    trained in full (modules_to_save) are not among them: lora_fx.trainable_parameters gives both."""
    owner, state = adapted_state(adapted, what="list the LoRA parameters of")
    for name, container in state.containers(owner).items():
        if adapter is not None and name != adapter:
            continue
        for lora in container.values():
            if adapter is not None or lora.enabled:
                yield lora.lora_A
                yield lora.lora_B


def trainable_parameters(adapted: nn.Module) -> list[nn.Parameter]:
    """What trains: every enabled adapter's A and B, and the parameters of the modules trained in full."""
    owner, state = adapted_state(adapted, what="list the trainable parameters of")
    params = list(lora_parameters(owner))
    for name in state.modules_to_save:
        params += [p for p in owner.get_submodule(name).parameters() if p.requires_grad]
    return list({id(p): p for p in params}.values())


def lora_state_dict(adapted: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, named as in adapted.state_dict()."""
    owner, state = adapted_state(adapted, what="take the LoRA state of")
    prefixes = tuple(container_name(a) + "." for a in state.adapters)
    return {k: v for k, v in owner.state_dict().items() if k.startswith(prefixes)}


def add_adapter(adapted: nn.Module, name: str, rules: Rule | Iterable[Rule] | None = None, *, r: int = 8,
                alpha: float = 16.0, dropout: float = 0.0) -> nn.Module:
    """Add another named adapter beside the existing ones, on sites chosen by its own rules (in place); every graph
    the model captured gets its branches."""
    owner, state = adapted_state(adapted, what="add an adapter to")
    inject_pass.check_adapter_name(name, state.adapters)
    rules = coerce_rules(rules)
    tied = {w: twins for w, twins in tied_weights(owner).items() if w not in state.untied}
    decisions = apply_policies(decide(state.sites, rules, _defaults(r, alpha, dropout)), tied=tied,
                               rules_given=rules is not None, untie=False, frontend=state.frontend)
    if not any(d.adapted for d in decisions):
        raise NoSitesError(f"the rules of adapter {name!r} match none of the sites "
                           f"{list(dict.fromkeys(s.name for s in state.sites))[:20]}", where=name,
                           fix="change the rules (lora_fx.plan lists the sites)")
    _add_branches(owner, state, name, decisions)
    state.rules[name], state.defaults[name] = rules, _defaults(r, alpha, dropout)
    container = getattr(owner, container_name(name))
    for gm in _graphs(owner):
        inject_pass.inject(gm, name, container, inject_pass.placements(gm.meta["lora_fx"].sites, container))
    return adapted


def _graphs(owner: nn.Module) -> list[fx.GraphModule]:
    """Every graph an adapted model holds (or the graph itself, when given one)."""
    if isinstance(owner, fx.GraphModule):
        return [owner]
    calls = owner.__dict__[adapted_model.CALLS]
    return list({id(e.graph): e.graph for entries in calls.graphs.values() for e in entries}.values())


def set_adapter(adapted: nn.Module, names: str | Iterable[str] | None) -> None:
    """Enable exactly the named adapters (None: none); the others add nothing until enabled again. It switches LoRA
    branches: modules trained in full keep their trained parameters (disable_adapters gives the base model)."""
    owner, state = adapted_state(adapted, what="switch adapters of")
    names = {names} if isinstance(names, str) else set(names or ())
    containers = state.containers(owner)
    unknown = names - set(containers)
    if unknown:
        raise InputError(f"no adapter named {sorted(unknown)}", where=type(owner).__name__,
                         fix=f"use one of {sorted(containers)}")
    for name, container in containers.items():
        for lora in container.values():
            lora.enabled = name in names


def active_adapters(adapted: nn.Module) -> list[str]:
    owner, state = adapted_state(adapted, what="list the adapters of")
    return [name for name, c in state.containers(owner).items() if any(lora.enabled for lora in c.values())]


@contextlib.contextmanager
def disable_adapters(adapted: nn.Module):
    """Inside the block the adapted model computes the base model's output: no LoRA branch adds anything, and the
    modules trained in full (modules_to_save) compute with the user's model's own parameters, as PEFT's
    disable_adapter does."""
    owner, state = adapted_state(adapted, what="disable the adapters of")
    before = active_adapters(adapted)
    originals = {}
    if state.modules_to_save and not isinstance(owner, fx.GraphModule):
        user = adapted_model.user_model(owner)
        originals = {f"{m}.{n}": p for m in state.modules_to_save for n, p in user.get_submodule(m).named_parameters()}
    trained = _swap_parameters(owner, originals)
    set_adapter(adapted, None)
    try:
        yield adapted
    finally:
        _swap_parameters(owner, trained)
        set_adapter(adapted, before)


def _swap_parameters(owner: nn.Module, values: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Put `values` in place of the adapted model's parameters of those names (in it and its captured graphs, not in
    the user's model); returns the parameters they replaced, to swap back."""
    if not values:  # nothing trained in full (or a bare graph, which holds no captured graphs)
        return {}
    replaced = {name: owner.get_parameter(name) for name in values}
    quantize.set_weights(owner, values, in_user_model=False)
    return replaced


def merge_adapter(adapted: nn.Module, name: str = DEFAULT, *, keep_original: bool = True) -> None:
    """Fold one adapter into W0 in place, keeping the model adapted so unmerge_adapter can take it out again.

    keep_original=True (default) keeps an exact copy of every W0 it changes, so unmerging is bit-exact; it costs
    one copy of those weights in memory. With False, unmerging subtracts the delta (within rounding error)."""
    owner, _ = adapted_state(adapted, what="merge an adapter of")
    fold_pass.merge_adapter(owner, name, keep_original=keep_original)


def unmerge_adapter(adapted: nn.Module) -> None:
    """Take the merged adapter back out of W0 and re-enable its branches."""
    owner, _ = adapted_state(adapted, what="unmerge an adapter of")
    fold_pass.unmerge_adapter(owner)


# ---------------------------------------------------------------------------------------------------- fold
def fold(adapted: nn.Module, *, inplace: bool = False, adapters: str | Iterable[str] | None = None,
         accumulate_dtype: torch.dtype | None = None, base: str = "auto") -> nn.Module:
    """The user's model with the LoRA folded in: W0 + (alpha/r)·B·A accumulated in fp32 (fp64 for fp32 weights)
    and rounded once, and the modules trained in full. Every graph the adapted model captured is checked to give
    back, without its LoRA nodes, the graph it was traced as (a failure is a lora_fx bug, never the user's).

    Returns a model of the user's own class (generate, save_pretrained, ONNX export all as for the original).
    inplace=False (default): a new model object whose folded weights are new tensors; the user's model and
    `adapted` keep theirs, so training can go on. inplace=True: writes into W0 (shared with the user's model) to
    save memory and returns the user's model; the adapted model then runs without its adapters.
    adapters: the adapter(s) to fold (default: every enabled one). Given a captured graph (lora_fx.graph), folds
    that graph and returns the folded GraphModule. accumulate_dtype overrides the accumulation.

    base: for a quantized base (lora_fx.quantize_base), the W0 the LoRA is added to: "dequantized" (the weights
    that were trained against), "original" (the exact W0 kept on the CPU) or "auto" (the closer one
    lora_fx.compare_folds measured; "dequantized" when nothing was measured). Ignored for a plain base."""
    owner, state = adapted_state(adapted, what="fold")
    if isinstance(adapted, LayerView):
        raise InputError("this is the layer view (split_layers / checkpoint_layers) of an adapted model, not the "
                         "adapted model", where=type(adapted).__name__,
                         fix="fold the model the view was made from: view.adapted (lora_fx.adapt's result)")
    sharded = _sharded_parameters(owner)
    if sharded:
        raise FoldError(f"the adapted model's parameters are sharded DTensors (FSDP2 fully_shard), e.g. {sharded[0]!r}: "
                        f"a fold needs whole weights", where="fold",
                        fix="gather first: {k: v.full_tensor() for k, v in adapted.state_dict().items()} on every "
                            "rank, load it into a plain lora_fx.adapt copy of the model, and fold that")
    if state.merged:
        raise FoldError(f"adapter {state.merged[-1]!r} is merged in place", where="fold",
                        fix="call lora_fx.unmerge_adapter(adapted) first, or fold with inplace=False after it")
    if isinstance(adapters, str):
        adapters = [adapters]
    if adapters is not None:
        unknown = set(adapters) - set(state.adapters)
        if unknown:
            raise InputError(f"no adapter named {sorted(unknown)}", where="fold",
                             fix=f"use one of {sorted(state.adapters)}")
        adapters = list(adapters)
    if isinstance(owner, fx.GraphModule):  # a captured graph: the graph-level fold
        return fold_pass.fold(owner, inplace=inplace, adapters=adapters, accumulate_dtype=accumulate_dtype).graph_module
    for gm in _graphs(owner):  # fold's promise, checked on every graph: without LoRA, the graph as traced
        fold_pass.check_folded_graph(gm)
    if state.quantized:
        if inplace:
            raise FoldError("the base weights are quantized: an in-place fold would write into quantized tensors",
                            where="fold", fix="fold with inplace=False (the default)")
        chosen = quantize.fold_base(state, base)
        return fold_pass.fold_model(owner, adapted_model.user_model(owner), adapters=adapters,
                                    accumulate_dtype=accumulate_dtype, plain=tuple(state.quantized),
                                    base_weight=lambda name: quantize.base_weight(owner, state, name, chosen))
    return fold_pass.fold_model(owner, adapted_model.user_model(owner), inplace=inplace, adapters=adapters,
                                accumulate_dtype=accumulate_dtype)


def graph(adapted: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> fx.GraphModule:
    """The GraphModule an adapted model runs for this call (captured now if it has none for it); with no inputs,
    the latest graph it ran in its current train/eval mode. What graph-level tools take: split_layers, export of
    the unmerged model, fold's node-for-node check."""
    owner, state = adapted_state(adapted, what="take a graph of")
    if isinstance(owner, fx.GraphModule):
        return owner
    return _entry(owner, example_inputs, example_kwargs).graph


def _entry(owner: nn.Module, args: tuple, kwargs: dict) -> adapted_model.Entry:
    calls = owner.__dict__[adapted_model.CALLS]
    if not args and not kwargs:  # the latest call in the model's current mode, captured again in it if need be
        entry = calls.latest(owner.training)
        if entry is not None:
            return entry
        latest = calls.latest()
        if latest is None or latest.arguments is None:
            raise adapted_model.require_inputs("this")
        arguments = latest.arguments
    else:
        arguments = calls.bind(args, kwargs)
    key = call_key(arguments, owner.training)
    entries = calls.entries(key) if key is not None else []
    if entries:
        return entries[0]
    with adapted_model.frozen_norms(owner):
        entry = capture_call(owner, arguments)
    calls.add(key, entry)
    return entry


def split_layers(adapted: nn.Module, *, checkpoint_every: int = 0, layers: str | None = None) -> LayerView:
    """A training view of `adapted`'s graph with one submodule per repeated layer (passes/split_layers.py): for
    per-layer FSDP2 (fully_shard each of view.layer_modules, then the view) and activation checkpointing
    (checkpoint_every=k: every k-th layer keeps only its inputs and recomputes the rest in the backward pass).

    layers: the module list to split at (default: the one with the most items, e.g. "model.layers"). The view
    computes the same values with the same parameters and module objects; train it, then fold, save and export
    `adapted` itself. Make it after add_adapter calls: it splits the graph as it is then (set_adapter and
    merge_adapter reach it). It splits the adapted model's latest graph in its current mode (lora_fx.graph); a call
    of another kind (other arguments, e.g. labels, or the other train/eval mode) runs through the same split of the
    adapted model's graph for that call (captured when first seen; view.train()/eval() captures ahead, outside
    torch.compile). Once its layers are sharded with fully_shard, calls of other kinds are refused."""
    owner, _ = adapted_state(adapted, what="split the layers of")
    if isinstance(owner, fx.GraphModule):
        return split_pass(owner, checkpoint_every, layers).graph_module
    entry = _entry(owner, (), {})
    view = split_pass(entry.graph, checkpoint_every, layers).graph_module
    view.__dict__["adapted"] = owner  # fold, save and export take the adapted model, which the view computes
    if entry.spec is not None:  # a torch.export graph takes the call's leaves: the view takes the call itself
        view.__dict__["call"] = (entry.spec, owner.__dict__[adapted_model.CALLS].signature)
    view.__dict__["route"] = _OtherCalls(owner, entry, checkpoint_every, layers)
    return view


class _OtherCalls:
    """The view's router: a call of another kind than the graph the view splits (labels given, the other train/eval
    mode: a graph bakes its arguments and its dropout in) runs through the same split of the adapted model's graph
    for that call (Entry.run), captured if need be; None for the view's own kind. A view whose parts FSDP2 sharded
    cannot: a new split's parts would read the sharded weights without their hooks."""

    def __init__(self, owner: nn.Module, entry: adapted_model.Entry, every: int, layers: str | None):
        self.owner, self.entry, self.every, self.layers = owner, entry, every, layers
        self.calls = owner.__dict__[adapted_model.CALLS]
        key = call_key(entry.arguments or {}, entry.training) or (("training", entry.training),)
        self.own = self.calls._slot(key)
        self.base_changes = self.calls.base_changes

    def __call__(self, view: LayerView, args: tuple, kwargs: dict):
        arguments = self.calls.bind(args, kwargs)
        key = call_key(arguments, self.owner.training)
        stale = self.calls.base_changes != self.base_changes  # quantize_base rewrote the graphs since the split
        if not stale and (key is None or self.calls._slot(key) == self.own):
            return None
        sharded = any(_is_fsdp(part) for parts in view.layer_modules.values() for part in parts)
        if stale and sharded:
            raise InputError("this layer view was split from the adapted model's graph before quantize_base "
                             "changed its base, and its layers are sharded (FSDP2)", where="LayerView",
                             fix="call quantize_base first, then make the view (split_layers / checkpoint_layers) "
                                 "and shard it")
        if sharded:
            raise InputError(f"this layer view was made for calls like {sorted(self.entry.arguments or {})} in "
                             f"{_mode(self.entry.training)} mode, and its layers are sharded (FSDP2); this call is "
                             f"another kind ({sorted(arguments)}, {_mode(self.owner.training)} mode)",
                             where="LayerView",
                             fix="make the view after a call of this kind (adapted(**batch) once, then "
                                 "split_layers / checkpoint_layers), and call it only with such calls")
        other = _entry(self.owner, args, kwargs)
        return lambda: other.run(arguments, self.every, self.layers, split=True)

    def prepare(self) -> None:
        """view.train() / view.eval(): capture and split the view's own call in the new mode now, outside any
        torch.compile (a capture inside one breaks its graph)."""
        arguments = self.entry.arguments
        if arguments and self.calls._slot(call_key(arguments, self.owner.training)) != self.own:
            _entry(self.owner, (), arguments).layer_view(self.every, self.layers)


def _mode(training: bool) -> str:
    return "training" if training else "eval"


def _is_fsdp(module: nn.Module) -> bool:
    """Whether FSDP2's fully_shard wrapped this module (it swaps the module's class for an FSDPModule subclass)."""
    return any(cls.__name__ == "FSDPModule" for cls in type(module).__mro__)


def checkpoint_layers(adapted: nn.Module, *, every: int = 1, layers: str | None = None) -> LayerView:
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

