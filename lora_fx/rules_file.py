"""Rules files: the same rules as Python objects, kept in TOML or JSON for command lines and config repos.

TOML (read with the standard library's tomllib):

    [defaults]            # optional: r / alpha / dropout for rule fields left unset
    r = 8
    alpha = 16
    dropout = 0.05

    [[rule]]              # tried in order; the first rule that matches a site decides it
    name = "lm_head"
    exclude = true

    [[rule]]
    role = ["attn.q", "attn.v"]
    r = 16

    [[rule]]
    module_type = "Linear"
    layers = "0:4"        # a range as "start:stop" (TOML has no range type); or 3, or [0, 1, 2, 3]

JSON: {"defaults": {"r": 8, ...}, "rules": [{"name": "lm_head", "exclude": true}, ...]}.
Both formats accept the list under "rule" or "rules". The suffix picks the format: .toml, or .json.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from lora_fx.errors import RuleError
from lora_fx.rules import Rule, coerce_rules, rule_from_dict

DEFAULT_KEYS = ("r", "alpha", "dropout")  # what `adapt` / `plan` take as defaults
FORMATS = {".toml": "toml", ".json": "json"}


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise RuleError(f"unknown rules file type {path.suffix or '(no suffix)'!r}", where=str(path),
                        fix="name the file *.toml or *.json")
    return fmt


def load_rules(path: str | os.PathLike) -> tuple[list[Rule], dict[str, Any]]:
    """Read a rules file: (rules in order, defaults dict with any of r / alpha / dropout).

    Every problem is a RuleError saying which file, which rule (0-based, as in lora_fx.plan) and which field."""
    path = Path(path)
    fmt = _format(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleError("rules file not found", where=str(path), fix="check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(f"cannot read the rules file: {e}", where=str(path), fix="check the file") from None
    if fmt == "toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except RecursionError:
            raise _too_deep(path) from None
        except tomllib.TOMLDecodeError as e:
            raise RuleError(f"not valid TOML: {e}", where=str(path),
                            fix="check the line named above; rules are [[rule]] tables, defaults a [defaults] table"
                            ) from None
    else:
        try:
            data = json.loads(text)
        except RecursionError:
            raise _too_deep(path) from None
        except json.JSONDecodeError as e:
            raise RuleError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", where=str(path),
                            fix='write {"defaults": {...}, "rules": [{...}, ...]}') from None
    return parse_rules(data, where=str(path))


def _too_deep(path: Path) -> RuleError:
    return RuleError("the file nests lists or tables too deeply to be read", where=str(path),
                     fix="a rules file is a list of flat tables; a field holds a string, a number or a list of them")


def parse_rules(data: Any, where: str = "rules") -> tuple[list[Rule], dict[str, Any]]:
    """The parsed content of a rules file (a dict) -> (rules, defaults)."""
    if isinstance(data, list):  # a bare JSON list of rules
        data = {"rules": data}
    if not isinstance(data, dict):
        raise RuleError(f"a rules file holds a table/object, got {type(data).__name__}", where=where,
                        fix='write {"defaults": {...}, "rules": [...]} (JSON) or [[rule]] tables (TOML)')
    unknown = sorted(set(data) - {"rule", "rules", "defaults"})
    if unknown:
        raise RuleError(f"unknown top-level key(s) {unknown}", where=where,
                        fix="a rules file has [[rule]] tables (or a 'rules' list) and an optional [defaults] table")
    if "rule" in data and "rules" in data:
        raise RuleError("both 'rule' and 'rules' are given", where=where, fix="put every rule in one list")
    items = data.get("rule", data.get("rules"))
    if items is None:
        raise RuleError("the file has no rules", where=where,
                        fix="add [[rule]] tables (TOML) or a 'rules' list (JSON)")
    if not isinstance(items, list):
        raise RuleError(f"'rule'/'rules' must be a list of tables, got {type(items).__name__}", where=where,
                        fix="in TOML write [[rule]] (two brackets) before each rule")
    if not items:
        raise RuleError("the rule list is empty", where=where,
                        fix="add a rule; to adapt every linear-like site call adapt/plan with rules=None")
    rules = [rule_from_dict(item, where=f"{where}: rule {i}") for i, item in enumerate(items)]
    return rules, parse_defaults(data.get("defaults", {}), where=f"{where}: [defaults]")


def parse_defaults(defaults: Any, where: str = "[defaults]") -> dict[str, Any]:
    if not isinstance(defaults, dict):
        raise RuleError(f"defaults must be a table, got {type(defaults).__name__}", where=where,
                        fix="write [defaults] with r = 8, alpha = 16, dropout = 0.0")
    unknown = sorted(set(defaults) - set(DEFAULT_KEYS))
    if unknown:
        raise RuleError(f"unknown default(s) {unknown}", where=where,
                        fix=f"defaults are {list(DEFAULT_KEYS)}; put other settings in the rules")
    try:
        Rule(**defaults)  # validated like a rule's fields, naming the bad one
    except RuleError as e:
        err = RuleError(e.what, where=where, fix=e.fix)
        err.field = getattr(e, "field", None)
        raise err from None
    return dict(defaults)


# ------------------------------------------------------------------------------------------------ writing
def dump_rules(rules: Rule | Iterable[Rule | dict], path: str | os.PathLike,
               defaults: dict[str, Any] | None = None) -> Path:
    """Write rules (and optional defaults) as TOML or JSON by the file's suffix. Classes are written by name."""
    path = Path(path)
    fmt = _format(path)
    rules = coerce_rules(rules if isinstance(rules, (Rule, dict)) else list(rules))
    defaults = parse_defaults(dict(defaults or {}), where="defaults")
    items = [r.to_dict() for r in rules]
    text = _to_toml(items, defaults) if fmt == "toml" else json.dumps(
        ({"defaults": defaults} if defaults else {}) | {"rules": items}, indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def dumps_toml(rules: Iterable[Rule], defaults: dict[str, Any] | None = None) -> str:
    """The TOML text dump_rules writes."""
    return _to_toml([r.to_dict() for r in coerce_rules(list(rules))], parse_defaults(dict(defaults or {})))


def _to_toml(items: list[dict], defaults: dict[str, Any]) -> str:
    lines = []
    if defaults:
        lines.append("[defaults]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in defaults.items())
        lines.append("")
    for item in items:
        lines.append("[[rule]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RuleError(f"cannot write {value!r} to a rules file", fix="use a finite number")
        return repr(value)  # 16.0, 0.05, 1e-05: all valid TOML floats
    if isinstance(value, str):
        # a TOML basic string takes JSON's escapes; DEL is the one character JSON leaves raw and TOML refuses
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007F")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise RuleError(f"cannot write a {type(value).__name__} to a rules file", fix="use strings, numbers and lists")
