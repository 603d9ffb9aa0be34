"""The public calls: adapt, lora_parameters, fold, plan.

    adapted = lora_fx.adapt(model, rules, example_inputs=(x,))   # trace -> match -> decide -> inject
    opt = torch.optim.AdamW(lora_fx.lora_parameters(adapted))     # only A and B train
    merged = lora_fx.fold(adapted)                                # original graph, W0 + (alpha/r)·B·A
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn

from lora_fx.errors import FoldError, InputError, NoSitesError
from lora_fx.passes import fold as fold_pass
from lora_fx.passes import inject as inject_pass
from lora_fx.passes.match import find_sites
from lora_fx.passes.trace import trace
from lora_fx.plan import Plan
from lora_fx.rules import LoraSettings, Rule, coerce_rules, decide


def _defaults(r: int, alpha: float, dropout: float) -> LoraSettings:
    Rule(r=r, alpha=alpha, dropout=dropout)  # validates the defaults the same way as a rule's fields
    return LoraSettings(r=r, alpha=float(alpha), dropout=float(dropout))


def _trace_and_decide(model, rules, example_inputs, example_kwargs, frontend, r, alpha, dropout, trace_options):
    rules = coerce_rules(rules)
    defaults = _defaults(r, alpha, dropout)
    traced = trace(model, example_inputs, example_kwargs, frontend=frontend, **trace_options)
    sites = find_sites(traced.graph_module, model)
    decisions = decide(sites, rules, defaults)
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
          dropout: float = 0.0, **trace_options: Any) -> fx.GraphModule:
    """Trace `model` and add LoRA beside every site the rules choose (rules=None: every linear-like site).

    Returns a GraphModule that shares the model's weights (no copies). Base parameters are frozen
    (requires_grad=False); nothing else in the model changes. r/alpha/dropout are the defaults for rule fields
    left unset. trace_options: leaf_modules=, open_modules=, concrete_args= for symbolic tracing.
    On any error the model is left exactly as it was.
    """
    traced, rules, sites, decisions = _trace_and_decide(model, rules, example_inputs, example_kwargs, frontend,
                                                        r, alpha, dropout, trace_options)
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
    gm = traced.graph_module
    state = inject_pass.new_state(gm, traced.frontend, sites, decisions)
    inject_pass.inject(gm, decisions, state)  # validates per-weight settings before touching the graph
    gm.meta["lora_fx"] = state
    for name, p in gm.named_parameters():  # freeze the base: every parameter outside the LoRA container
        if not name.startswith(inject_pass.CONTAINER + "."):
            p.requires_grad_(False)
    return gm


def lora_parameters(adapted: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable LoRA parameters (every A and B) of an adapted module."""
    container = _container(adapted)
    for lora in container.values():
        yield lora.lora_A
        yield lora.lora_B


def lora_state_dict(adapted: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, named as in adapted.state_dict()."""
    return {k: v for k, v in adapted.state_dict().items() if k.startswith(inject_pass.CONTAINER + ".")}


def fold(adapted: fx.GraphModule, *, inplace: bool = False,
         accumulate_dtype: torch.dtype = torch.float32) -> fx.GraphModule:
    """W0 + (alpha/r)·B·A accumulated in fp32 and rounded once; every LoRA node removed.

    The result's graph equals the traced original node for node and its parameters keep the model's names.
    inplace=False (default): a new module whose folded weights are new tensors; `adapted` and the user's model
    keep theirs, so training can go on. inplace=True: writes into W0 (shared with the user's model) to save memory.
    """
    _container(adapted)
    return fold_pass.fold(adapted, inplace=inplace, accumulate_dtype=accumulate_dtype).graph_module


def _container(adapted: Any) -> nn.ModuleDict:
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
