"""Rules say which sites get LoRA and with what settings.

A rule is a set of selectors (all must hold) plus LoRA settings. Rules are tried in order; the first rule whose
selectors all hold for a site decides it; an `exclude=True` rule decides "no LoRA". Settings a rule leaves as None
come from the defaults given once to `adapt` / `plan`.

    rules = [
        Rule(name="lm_head", exclude=True),
        Rule(role=["attn.q", "attn.v"], r=8, alpha=16),
        Rule(op="linear_module", layers=range(0, 4), r=4),
    ]

Name selectors look at two qualified names of a site: its module's (e.g. "layers.0.attn.q") and its weight's
("layers.0.attn.q.weight"). `name` is a regex that must match the whole name or a whole dotted suffix of it, so
"q_proj" matches "model.layers.0.self_attn.q_proj" (the same convention as PEFT's rank_pattern); `glob` is an
fnmatch pattern on the whole name.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterable

from lora_fx.errors import RuleError
from lora_fx.lora import INITS, SCALINGS
from lora_fx.site import OP_KINDS, Site


def _as_tuple(value: Any) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, (str, int, type)):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class Rule:
    # --- selectors (None = any) ---
    name: str | None = None  # regex on the module or weight name (whole name or a dotted suffix)
    glob: str | None = None  # fnmatch pattern on the module or weight name
    op: str | tuple[str, ...] | None = None  # "linear_module", "functional_linear", "matmul", "conv1d"
    module_type: Any = None  # class or class name (or several) of the module owning the weight
    in_features: int | tuple[int, ...] | None = None
    out_features: int | tuple[int, ...] | None = None
    layers: Any = None  # layer index: int, range or list of ints
    role: str | tuple[str, ...] | None = None  # graph role: "attn.q", "attn.k", "attn.v", "attn.out", "mlp"
    exclude: bool = False  # a matching site gets no LoRA
    # --- LoRA settings (None = the default given to adapt) ---
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    scaling: str | None = None  # "standard" (alpha/r) or "rslora" (alpha/sqrt(r))
    init: str | None = None  # "kaiming" (paper) or "gaussian"

    def __post_init__(self) -> None:
        # Normalise list-like selectors to tuples so rules stay hashable and print the same way.
        for key in ("op", "in_features", "out_features", "role"):
            object.__setattr__(self, key, _as_tuple(getattr(self, key)))
        if self.module_type is not None:
            object.__setattr__(self, "module_type", _as_tuple(self.module_type))
        if self.layers is not None:
            object.__setattr__(self, "layers", frozenset(_as_tuple(self.layers)))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Refuse malformed rules when they are made, naming the field."""
        where = f"rule {self.describe()}"
        for key in ("name",):
            pattern = getattr(self, key)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise RuleError(f"`{key}` is not a valid regex: {e}", where=where,
                                    fix="escape dots and brackets, or use glob= for shell-style patterns") from None
        if self.op is not None:
            bad = [o for o in self.op if o not in OP_KINDS]
            if bad:
                raise RuleError(f"unknown op kind(s) {bad}", where=where, fix=f"use one of {list(OP_KINDS)}")
        if self.r is not None and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0):
            raise RuleError(f"r must be a positive integer, got {self.r!r}", where=where, fix="use e.g. r=8")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise RuleError(f"alpha must be a positive number, got {self.alpha!r}", where=where, fix="use e.g. alpha=16")
        if self.dropout is not None and not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise RuleError(f"dropout must be in [0, 1), got {self.dropout!r}", where=where, fix="use e.g. dropout=0.05")
        if self.scaling is not None and self.scaling not in SCALINGS:
            raise RuleError(f"unknown scaling {self.scaling!r}", where=where, fix=f"use one of {list(SCALINGS)}")
        if self.init is not None and self.init not in INITS:
            raise RuleError(f"unknown init {self.init!r}", where=where, fix=f"use one of {list(INITS)}")
        if self.layers is not None and not all(isinstance(i, int) for i in self.layers):
            raise RuleError(f"layers must be ints, got {sorted(map(repr, self.layers))}", where=where,
                            fix="use an int, a range or a list of ints")

    # ------------------------------------------------------------------ matching
    def check(self, site: Site) -> str | None:
        """None when every selector holds for `site`, else the reason the first failing one gives."""
        names = (site.module, site.weight) if site.module else (site.weight,)
        if self.name is not None and not any(_name_matches(self.name, n) for n in names):
            return f"name {site.name!r} does not match {self.name!r}"
        if self.glob is not None and not any(fnmatch.fnmatchcase(n, self.glob) for n in names):
            return f"name {site.name!r} does not match glob {self.glob!r}"
        if self.op is not None and site.op not in self.op:
            return f"op {site.op} not in {list(self.op)}"
        if self.module_type is not None and not any(_type_matches(t, site.module_type) for t in self.module_type):
            return f"module type {site.module_type} not in {[getattr(t, '__name__', t) for t in self.module_type]}"
        if self.in_features is not None and site.in_features not in self.in_features:
            return f"in_features {site.in_features} not in {list(self.in_features)}"
        if self.out_features is not None and site.out_features not in self.out_features:
            return f"out_features {site.out_features} not in {list(self.out_features)}"
        if self.layers is not None and site.layer not in self.layers:
            return f"layer {site.layer} not in {sorted(self.layers)}"
        if self.role is not None and not set(self.role) & set(site.roles):
            return f"roles {list(site.roles) or 'none'} do not include {list(self.role)}"
        return None

    def describe(self) -> str:
        """A short form such as Rule(name='q_proj', r=8) for tables and messages."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "exclude" and not value):
                continue
            if f.name == "layers":
                value = sorted(value)
            elif f.name == "module_type":
                value = [getattr(t, "__name__", t) for t in value]
            elif isinstance(value, tuple) and len(value) == 1:
                value = value[0]
            shown.append(f"{f.name}={value!r}")
        return f"Rule({', '.join(shown)})"

    def to_dict(self) -> dict:
        """A JSON/TOML-ready dict of the fields that are set (classes are written by name)."""
        out = {}
        for key, value in asdict(self).items():
            if value is None or (key == "exclude" and not value):
                continue
            if key == "layers":
                value = sorted(value)
            elif key == "module_type":
                value = [getattr(t, "__name__", t) for t in self.module_type]
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out


def _name_matches(pattern: str, name: str) -> bool:
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) is not None


def _type_matches(wanted: Any, type_name: str) -> bool:
    return (getattr(wanted, "__name__", None) or str(wanted)) == type_name


@dataclass(frozen=True)
class LoraSettings:
    """The settings a site ends up with: its rule's, with the defaults filled in."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    scaling: str = "standard"
    init: str = "kaiming"

    @staticmethod
    def resolve(rule: Rule, defaults: "LoraSettings") -> "LoraSettings":
        return replace(defaults, **{k: getattr(rule, k) for k in ("r", "alpha", "dropout", "scaling", "init")
                                    if getattr(rule, k) is not None})


@dataclass(frozen=True)
class Decision:
    """What the rules decided for one site: which rule took it (index), and with what settings (None = no LoRA)."""

    site: Site
    rule_index: int | None
    settings: LoraSettings | None
    reason: str = ""

    @property
    def adapted(self) -> bool:
        return self.settings is not None


def decide(sites: Iterable[Site], rules: list[Rule] | None, defaults: LoraSettings) -> list[Decision]:
    """First matching rule wins; rules=None adapts every site with the defaults."""
    decisions = []
    for site in sites:
        if rules is None:
            decisions.append(Decision(site, None, defaults, "rules=None: every linear-like site"))
            continue
        reasons = []
        for i, rule in enumerate(rules):
            why_not = rule.check(site)
            if why_not is None:
                settings = None if rule.exclude else LoraSettings.resolve(rule, defaults)
                decisions.append(Decision(site, i, settings, f"rule {i} {'excludes' if rule.exclude else 'matches'}"))
                break
            reasons.append(f"rule {i}: {why_not}")
        else:
            decisions.append(Decision(site, None, None, "; ".join(reasons) or "no rules"))
    return decisions


def coerce_rules(rules: Any) -> list[Rule] | None:
    """Accept None, one Rule, a list of Rules or of dicts (as read from a rules file)."""
    if rules is None:
        return None
    if isinstance(rules, (Rule, dict)):
        rules = [rules]
    if not isinstance(rules, (list, tuple)):
        raise RuleError(f"rules must be a Rule or a list of Rules, got {type(rules).__name__}",
                        fix="pass rules=[Rule(name='q_proj', r=8)] or rules=None for every linear-like site")
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, dict):
            rule = rule_from_dict(rule, where=f"rules[{i}]")
        if not isinstance(rule, Rule):
            raise RuleError(f"rules[{i}] is a {type(rule).__name__}, not a Rule", where=f"rules[{i}]",
                            fix="build it with lora_fx.Rule(...)")
        out.append(rule)
    if not out:
        raise RuleError("the rule list is empty", fix="pass rules=None to adapt every linear-like site")
    return out


def rule_from_dict(data: dict, where: str = "rule") -> Rule:
    known = {f.name for f in fields(Rule)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RuleError(f"unknown field(s) {unknown}", where=where, fix=f"fields are {sorted(known)}")
    try:
        return Rule(**data)
    except RuleError as e:
        raise RuleError(e.what, where=f"{where}: {e.where}", fix=e.fix) from None
    except TypeError as e:
        raise RuleError(f"bad field value: {e}", where=where, fix="check the types of the fields") from None
