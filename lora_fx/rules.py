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

`role` names what a site does in the graph ("attn.q", "attn.k", "attn.v", "attn.out", "mlp", or one added with
lora_fx.passes.roles.register_role); roles are found from the graph's structure by lora_fx.passes.roles and checked
against the registry when rules are applied (`decide`). A malformed field raises RuleError when the Rule is made,
naming the field (also in `error.field`). Rules files (TOML/JSON): lora_fx.rules_file. Reference: docs/rules.md.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable

from lora_fx import patterns
from lora_fx.errors import RuleError
from lora_fx.lora import INITS, SCALINGS
from lora_fx.site import OP_KINDS, Site
from lora_fx.site_kinds import kind_of


ROUTER = "moe.router"  # lora_fx.passes.roles.ROUTER: the role rules=None and rules that do not name it leave alone


def _as_tuple(value: Any) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float, type)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        return (value,)  # validate() names the field


_LAYER_SPAN = re.compile(r"^\s*(\d*)\s*:\s*(\d+)\s*(?::\s*([1-9]\d*)\s*)?$")


def _layers(value: Any) -> tuple:
    """int, range, list of ints, or a "start:stop[:step]" string (rules files have no range type), as a sorted
    tuple of ints and ranges. Spans stay ranges: "0:10000000000" is one small object, and `layer in span` is O(1)."""
    out = []
    for item in (value,) if isinstance(value, (str, range)) else _as_tuple(value):
        m = _LAYER_SPAN.match(item) if isinstance(item, str) else None
        if m is not None:
            item = range(int(m.group(1) or 0), int(m.group(2)), int(m.group(3) or 1))
        out.append(item)
    try:
        return tuple(sorted(dict.fromkeys(out), key=_layer_key))
    except TypeError:
        return tuple(out)  # validate() reports the items that are neither ints nor spans


def _layer_key(item: Any) -> tuple:
    return (item.start, item.stop, item.step) if isinstance(item, range) else (item, item + 1, 1)


def _in_layers(layer: Any, layers: tuple) -> bool:
    # only ints are looked up: `x in range(...)` for anything else walks the whole range
    return _is_int(layer) and any(layer == item if _is_int(item) else layer in item for item in layers)


def _span_text(span: range) -> str:
    return f"{span.start}:{span.stop}" + (f":{span.step}" if span.step != 1 else "")


def _layers_shown(layers: tuple) -> Any:
    """What describe() and to_dict() write: ints as ints, spans as "start:stop[:step]" (which _layers reads back);
    one item alone, several as a list."""
    shown = [_span_text(i) if isinstance(i, range) else i for i in layers]
    return shown[0] if len(shown) == 1 and isinstance(shown[0], str) else shown


def _bad(field_name: str, what: str, where: str, fix: str) -> RuleError:
    """A RuleError that names the field (also kept as `.field` for tools and tests)."""
    named = re.match(rf"`?{re.escape(field_name)}`?\b", what) is not None
    err = RuleError(what if named else f"`{field_name}`: {what}", where=where, fix=fix)
    err.field = field_name
    return err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_span(value: Any) -> bool:
    """A range of layer indices with a positive step, as "start:stop[:step]" can write it back."""
    return isinstance(value, range) and value.start >= 0 and value.stop >= 0 and value.step > 0


@dataclass(frozen=True)
class Rule:
    # --- selectors (None = any) ---
    name: str | None = None  # regex on the module or weight name (whole name or a dotted suffix)
    glob: str | None = None  # fnmatch pattern on the module or weight name
    op: str | tuple[str, ...] | None = None  # "linear_module", "functional_linear", "matmul", "conv1d"
    module_type: Any = None  # class or class name (or several) of the module owning the weight
    in_features: int | tuple[int, ...] | None = None
    out_features: int | tuple[int, ...] | None = None
    layers: Any = None  # layer index: int, range, list of ints, or "start:stop" string
    role: str | tuple[str, ...] | None = None  # graph role: "attn.q", "attn.k", "attn.v", "attn.out", "mlp", ...
    exclude: bool = False  # a matching site gets no LoRA
    # --- LoRA settings (None = the default given to adapt) ---
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    scaling: str | None = None  # "standard" (alpha/r) or "rslora" (alpha/sqrt(r))
    init: str | None = None  # "kaiming" (paper) or "gaussian"

    def __post_init__(self) -> None:
        # Normalise list-like selectors to tuples so rules stay hashable and print the same way.
        for key in ("op", "in_features", "out_features", "role", "module_type"):
            object.__setattr__(self, key, _as_tuple(getattr(self, key)))
        if self.layers is not None:
            object.__setattr__(self, "layers", _layers(self.layers))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Refuse malformed rules when they are made, naming the field."""
        where = f"rule {self.describe()}"
        for key in ("name", "glob"):
            pattern = getattr(self, key)
            if pattern is not None and not isinstance(pattern, str):
                raise _bad(key, f"`{key}` must be a string, got {type(pattern).__name__} {pattern!r}", where,
                           f"use e.g. {key}='q_proj'")
        if self.name is not None:
            try:
                patterns.check_syntax(self.name)  # alone: "a)|(b" would escape the group it is matched in
                patterns.check_syntax(_name_pattern(self.name))  # as matched: "(?i)q" inside the group is an error
            except re.error as e:
                raise _bad("name", f"`name` is not a valid regex: {e}", where,
                           "escape dots and brackets, or use glob= for shell-style patterns") from None
        if self.op is not None:
            bad = [o for o in self.op if o not in OP_KINDS]
            if bad:
                raise _bad("op", f"op: unknown op kind(s) {bad}", where, f"use one of {list(OP_KINDS)}")
        if self.module_type is not None:
            bad = [t for t in self.module_type if not isinstance(t, (str, type))]
            if bad:
                raise _bad("module_type", f"module_type must be classes or class names, got {bad!r}", where,
                           "use e.g. module_type=torch.nn.Linear or module_type='Linear'")
        for key in ("in_features", "out_features"):
            value = getattr(self, key)
            if value is not None and not all(_is_int(v) and v > 0 for v in value):
                raise _bad(key, f"{key} must be positive integers, got {list(value)!r}", where,
                           f"use e.g. {key}=768 or {key}=[768, 3072]")
        if self.layers is not None and not all(_is_int(i) or _is_span(i) for i in self.layers):
            raise _bad("layers", f"layers must be ints, got {sorted(map(repr, self.layers))}", where,
                       'use an int, a range, a list of ints or a "start:stop" string')
        empty = [i for i in self.layers or () if _is_span(i) and len(i) == 0]
        if empty:
            raise _bad("layers", f"layers {_layers_shown(tuple(empty))} hold no layer (start >= stop)", where,
                       'give start < stop, e.g. layers="2:5" for layers 2, 3 and 4')
        if self.role is not None:
            bad = [x for x in self.role if not isinstance(x, str) or not x]
            if bad or not self.role:
                raise _bad("role", f"role must be role names (strings), got {list(self.role)!r}", where,
                           "use e.g. role='attn.q' or role=['attn.q', 'attn.v']")
        if not isinstance(self.exclude, bool):
            raise _bad("exclude", f"exclude must be true or false, got {self.exclude!r}", where,
                       "use exclude=True to keep matching sites without LoRA")
        if self.r is not None and (not _is_int(self.r) or self.r <= 0):
            raise _bad("r", f"r must be a positive integer, got {self.r!r}", where, "use e.g. r=8")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                           and math.isfinite(self.alpha) and self.alpha > 0):
            raise _bad("alpha", f"alpha must be a positive number, got {self.alpha!r}", where, "use e.g. alpha=16")
        if self.dropout is not None and not (isinstance(self.dropout, (int, float))
                                             and not isinstance(self.dropout, bool) and 0 <= self.dropout < 1):
            raise _bad("dropout", f"dropout must be in [0, 1), got {self.dropout!r}", where,
                       "use e.g. dropout=0.05")
        if self.scaling is not None and self.scaling not in SCALINGS:
            raise _bad("scaling", f"unknown scaling {self.scaling!r}", where, f"use one of {list(SCALINGS)}")
        if self.init is not None and self.init not in INITS:
            raise _bad("init", f"unknown init {self.init!r}", where, f"use one of {list(INITS)}")

    # ------------------------------------------------------------------ matching
    def check(self, site: Site, role: str | None = None) -> str | None:
        """None when every selector holds for `site`, else the reason the first failing one gives.

        role: check one role slice of a packed weight (the q rows of a fused qkv) instead of the whole site."""
        names = (site.module, site.weight) if site.module else (site.weight,)
        kind = kind_of(site)
        if not kind.implicit and self.op is None and self.module_type is None and self.name is None \
                and self.glob is None:
            return (f"a {kind.name} site is taken only by a rule that names it (op={kind.ops[0]!r}, module_type=, "
                    f"name= or glob=)")
        if ROUTER in site.roles and self.name is None and self.glob is None and ROUTER not in (self.role or ()):
            return f"an MoE router is adapted only by a rule that names it (role={ROUTER!r}, name= or glob=)"
        if self.name is not None and not self._name_holds(names):
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
        if self.layers is not None and not _in_layers(site.layer, self.layers):
            return f"layer {site.layer} not in {_layers_shown(self.layers)}"
        if self.role is not None and role is not None and role not in self.role:
            return f"slice {role} not in roles {list(self.role)}"
        if self.role is not None and role is None and not set(self.role) & set(site.roles):
            return f"roles {list(site.roles) or 'none'} do not include {list(self.role)}"
        return None

    def _name_holds(self, names: tuple) -> bool:
        try:
            return any(_name_matches(self.name, n) for n in names)
        except patterns.SlowPattern as e:  # a runaway regex, typically from someone else's rules file
            source = getattr(self, "_source", None)
            raise _bad("name", f"`name` is unusable: {e}",
                       f"{source}: rule {self.describe()}" if source else f"rule {self.describe()}",
                       patterns.SLOW_FIX) from None

    def matched_roles(self, site: Site) -> tuple[str, ...]:
        """The site's roles this rule selects: all of them without a role selector, else the ones it names.

        For a packed weight (GPT-2's c_attn has roles q, k and v) this says which slices the rule means."""
        if self.role is None:
            return tuple(site.roles)
        return tuple(r for r in site.roles if r in self.role)

    def describe(self) -> str:
        """A short form such as Rule(name='q_proj', r=8) for tables and messages."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "exclude" and not value):
                continue
            if f.name == "layers":
                value = _layers_shown(value)
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
                value = _layers_shown(value)
            elif key == "module_type":
                value = [getattr(t, "__name__", t) for t in self.module_type]
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out


def _name_pattern(pattern: str) -> str:
    """`name` matches the whole name or a whole dotted suffix of it."""
    return rf"(?:.*\.)?(?:{pattern})"


def _name_matches(pattern: str, name: str) -> bool:
    return patterns.fullmatch(_name_pattern(pattern), name, shown=pattern)


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
    """What the rules decided for one site, or for one role slice of a packed site: which rule took it (index), and
    with what settings (None = no LoRA)."""

    site: Site
    rule_index: int | None
    settings: LoraSettings | None
    reason: str = ""
    # A role slice of a packed weight that gets its own LoRA: ((role, row ranges),); () = the whole weight
    rows: tuple = ()
    # the r the rule (or the defaults) asked for, when it was larger than the site allows and was capped
    requested_r: int | None = None
    # the roles the deciding rule selected this by (its slice's role, or the site's roles it names); () without a
    # role selector. Adapter files record them so a load can rebuild the same LoRAs
    roles: tuple[str, ...] = ()
    # why a site the rule selected cannot take a LoRA (a grouped convolution), when that is why it has none
    refusal: str = ""

    @property
    def adapted(self) -> bool:
        return self.settings is not None

    @property
    def slice_role(self) -> str | None:
        return self.rows[0][0] if len(self.rows) == 1 else None

    @property
    def max_rank(self) -> int:
        """min(in, out) of what this decision adapts: r above it would not be a low-rank update."""
        out = sum(end - start for _, ranges in self.rows for start, end in ranges) or self.site.out_features
        fan_in = self.site.in_features * math.prod(self.site.param("kernel_size", ()))  # a conv's A sees a kernel
        return min(fan_in, out)


def check_roles(rules: list[Rule] | None) -> None:
    """Every role a rule names must be known (built in, or added with lora_fx.passes.roles.register_role).

    Checked when rules are applied, not when they are made, so roles registered after a rules file was read count."""
    if not rules or all(rule.role is None for rule in rules):
        return
    from lora_fx.passes.roles import known_roles  # the roles pass loads networkx: only when a rule needs it

    known = known_roles()
    for i, rule in enumerate(rules):
        for role in rule.role or ():
            if role not in known:
                near = difflib.get_close_matches(role, known, n=3, cutoff=0.4)
                raise _bad("role", f"unknown role {role!r}" + (f" (did you mean {near}?)" if near else ""),
                           getattr(rule, "_source", None) or f"rules[{i}] {rule.describe()}",
                           f"known roles: {list(known)}; add one with lora_fx.passes.roles.register_role(name, finder)")


def decide(sites: Iterable[Site], rules: list[Rule] | None, defaults: LoraSettings, *,
           fit_rank: bool = True) -> list[Decision]:
    """First matching rule wins; rules=None adapts every site with the defaults.

    A packed weight (a fused qkv whose rows the roles pass split into q, k and v) is decided slice by slice: each
    role slice goes to the first rule that selects it, so Rule(role="attn.q", r=4) and Rule(role="attn.v", r=8)
    both apply. When one rule without a role selector takes every slice, the weight gets one whole LoRA.
    fit_rank: r larger than min(in, out) of what a decision adapts is capped to it (Decision.requested_r keeps
    the r asked for); adapter files pass False, since their tensors fix r."""
    check_roles(rules)
    decisions = [d for site in sites for d in _decide_site(site, rules, defaults)]
    return [_fit_rank(d) for d in decisions] if fit_rank else decisions


def _decide_site(site: Site, rules: list[Rule] | None, defaults: LoraSettings) -> list[Decision]:
    if rules is None and not kind_of(site).implicit:
        return [Decision(site, None, None, f"rules=None adapts linear-like sites; a {kind_of(site).name} site needs "
                                           f"a rule that names it, e.g. Rule(op={kind_of(site).ops[0]!r})")]
    if rules is None and ROUTER in site.roles:
        return [Decision(site, None, None, f"rules=None leaves the MoE router frozen (docs/rules.md); select it with "
                                           f"Rule(role={ROUTER!r})")]
    if rules is None:
        return [Decision(site, None, defaults, "rules=None: every linear-like site")]
    if not site.role_rows:
        return [_first_match(site, rules, defaults)]
    slices = [_first_match(site, rules, defaults, (role, ranges)) for role, ranges in site.role_rows]
    taken = {d.rule_index for d in slices}
    if taken == {None} or (len(taken) == 1 and rules[slices[0].rule_index].role is None):
        return [_first_match(site, rules, defaults)]  # no rule, or one rule without a role, took the whole weight
    return slices


def _first_match(site: Site, rules: list[Rule], defaults: LoraSettings, piece: tuple = ()) -> Decision:
    """The decision of the first rule that selects `site` (or its role slice `piece` = (role, row ranges))."""
    role = piece[0] if piece else None
    reasons = []
    for i, rule in enumerate(rules):
        why_not = rule.check(site, role)
        if why_not is None:
            verb = "excludes" if rule.exclude else "matches"
            settings = None if rule.exclude else LoraSettings.resolve(rule, defaults)
            roles = (role,) if role else rule.matched_roles(site) if rule.role is not None else ()
            refusal = kind_of(site).check(site) if settings is not None else None
            if refusal:
                return Decision(site, i, None, f"rule {i} matches, but {refusal}", roles=roles, refusal=refusal)
            reason = f"rule {i} {verb}" + (f" the {role} rows" if role else "")
            if rule.role is not None and site.rows_lost and settings is not None:
                reason += (f"; the rows of each of {list(site.roles)} could not be followed ({site.rows_lost}), so "
                           f"the LoRA covers the whole weight")
            return Decision(site, i, settings, reason, (piece,) if piece else (), roles=roles)
        reasons.append(f"rule {i}: {why_not}")
    return Decision(site, None, None, "; ".join(reasons) or "no rules", (piece,) if piece else ())


def _fit_rank(d: Decision) -> Decision:
    """Cap r at min(in, out): a 2-label classifier head takes r=2 from a default of 8 (its update is then full
    rank, as small as it can be). The plan shows both numbers."""
    if not d.adapted or d.settings.r <= d.max_rank:
        return d
    return replace(d, settings=replace(d.settings, r=d.max_rank), requested_r=d.settings.r,
                   reason=f"{d.reason}; r capped {d.settings.r} -> {d.max_rank} = min(in, out)")


def unused_rules(rules: list[Rule] | None, decisions: list[Decision]) -> list[int]:
    """Indices of the rules that decided no site (a rule shadowed by earlier ones counts as unused)."""
    if not rules:
        return []
    used = {d.rule_index for d in decisions}
    return [i for i in range(len(rules)) if i not in used]


def explain_unused(rule: Rule, sites: list[Site], n: int = 3) -> str:
    """Why a rule selects nothing, for warnings and strict errors: nearest names, or the roles the graph has."""
    candidates = [s for s in sites if rule.check(s) is None]
    if candidates:
        return f"it matches {list(dict.fromkeys(s.name for s in candidates))[:5]} but earlier rules took them first"
    parts = []
    if rule.name is not None or rule.glob is not None:
        names = sorted({s.name for s in sites})
        near = difflib.get_close_matches(rule.name or rule.glob, names, n=n, cutoff=0.3)
        parts.append(f"no site name matches; nearest names: {near or names[:n]}")
    if rule.role is not None:
        present = sorted({r for s in sites for r in s.roles})
        missing = [r for r in rule.role if r not in present]
        if missing:
            parts.append(f"the graph has no site with role {missing} (roles found: {present or 'none'})")
    if not parts:
        reasons = {rule.check(s) for s in sites}
        parts.append("; ".join(sorted(r for r in reasons if r))[:300] or "there are no sites")
    return "; ".join(parts)


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
    if not isinstance(data, dict):
        raise RuleError(f"a rule must be a table/object of fields, got {type(data).__name__} {data!r}", where=where,
                        fix="write each rule as a table of fields, e.g. {\"name\": \"q_proj\", \"r\": 8}")
    known = {f.name for f in fields(Rule)}
    unknown = sorted(set(data) - known)
    if unknown:
        near = {u: difflib.get_close_matches(u, known, n=1, cutoff=0.5) for u in unknown}
        hint = "; ".join(f"{u!r} -> {n[0]!r}?" for u, n in near.items() if n)
        err = RuleError(f"unknown field(s) {unknown}" + (f" ({hint})" if hint else ""), where=where,
                        fix=f"fields are {sorted(known)}")
        err.field = unknown[0]
        raise err
    try:
        rule = Rule(**data)
    except RuleError as e:
        err = RuleError(e.what, where=f"{where}: {e.where}", fix=e.fix)
        err.field = getattr(e, "field", None)
        raise err from None
    except TypeError as e:
        raise RuleError(f"bad field value: {e}", where=where, fix="check the types of the fields") from None
    object.__setattr__(rule, "_source", where)  # not a field: errors found when the rule is used name the file
    return rule
