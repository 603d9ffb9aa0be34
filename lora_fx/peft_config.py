"""A PEFT adapter_config.json, checked before lora_fx acts on it.

The file comes from someone else. Every field lora_fx reads must have the type and range PEFT gives it (a string
"false" is not false); fields of PEFT variants lora_fx does not know are refused rather than dropped; the regexes in
it (rank_pattern / alpha_pattern keys, target_modules, exclude_modules, layers_pattern) are matched with PEFT's
rules but in bounded time (lora_fx.patterns); and every module the tensors hold LoRA weights for must be one the
config targets, since PEFT applies only those (a folder whose config says layers_to_transform=[1] but whose
tensors cover every layer is inconsistent, and loading all of it would not give PEFT's model).
"""

from __future__ import annotations

import math
import re
from typing import Any

from lora_fx import patterns
from lora_fx.errors import AdapterFileError

#: PEFT's file names in an adapter folder (PeftModel.save_pretrained), defined here once for every reader and writer.
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"  # the pickle format, which lora_fx never loads

# LoraConfig's fields (peft 0.21) and the metadata PEFT writes beside them. A field outside this list holding a
# value belongs to a PEFT lora_fx does not know, and may change the math: refused.
KNOWN_FIELDS = frozenset("""
    task_type peft_type auto_mapping peft_version base_model_name_or_path revision inference_mode r target_modules
    exclude_modules lora_alpha lora_dropout fan_in_fan_out bias use_rslora modules_to_save init_lora_weights
    layers_to_transform layers_pattern rank_pattern alpha_pattern megatron_config megatron_core
    trainable_token_indices loftq_config eva_config corda_config lora_ga_config use_dora velora_config
    alora_invocation_tokens use_qalora qalora_group_size monteclora_config layer_replication runtime_config lora_bias
    target_parameters use_bdlora arrow_config kasa_config ensure_weight_tying
""".split())
# Sub-configs of variants that change what a LoRA computes (the older ones are refused in peft_compat._UNSUPPORTED).
VARIANTS = {"velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA"}
PLAIN_INITS = (True, False, "gaussian")  # inits that leave the base weights alone
ALL_LINEAR = "all-linear"  # PEFT's shorthand, resolved against the model's modules, not by name
_FIX = "the file was edited by hand or written by another tool: save the adapter again with PeftModel.save_pretrained"


def _error(what: str, where: str, fix: str = _FIX) -> AdapterFileError:
    return AdapterFileError(what, where=where, fix=fix)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_fields(config: dict, where: str) -> None:
    """Refuse values PEFT would not hold (wrong type, out of range, a regex that does not compile) and variants
    lora_fx does not know, naming the field."""
    problems = []
    unknown = sorted(k for k in config if k not in KNOWN_FIELDS and config[k] not in (None, False, 0, "", [], {}))
    if unknown:
        problems.append(f"fields lora_fx does not know, from a newer PEFT or another variant: "
                        f"{ {k: config[k] for k in unknown[:5]} }")
    problems += [f"{k}={config[k]!r} ({name})" for k, name in VARIANTS.items() if config.get(k)]
    init = config.get("init_lora_weights", True)
    if not (init in PLAIN_INITS and type(init) in (bool, str)):
        problems.append(f"init_lora_weights={init!r} (only true, false and 'gaussian' leave the base weights as "
                        f"they were)")
    if problems:
        raise _error("the PEFT adapter uses features lora_fx does not support: " + "; ".join(problems), where,
                     "train a plain LoRA adapter, or merge it with PEFT's merge_and_unload")

    def bad(field: str, want: str) -> None:
        problems.append(f"{field}={config[field]!r} is not {want}")

    r, alpha, dropout = config.get("r", 8), config.get("lora_alpha", 8), config.get("lora_dropout")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        bad("r", "a positive integer")
    if not (_number(alpha) and alpha > 0):
        bad("lora_alpha", "a positive number")
    if dropout is not None and not (_number(dropout) and 0 <= dropout < 1):
        bad("lora_dropout", "a number in [0, 1)")
    for field in ("use_rslora", "fan_in_fan_out", "inference_mode"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            bad(field, "true or false")
    for field, want in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        table = config.get(field)
        if table is None:
            continue
        if not isinstance(table, dict):
            bad(field, "an object of {regex: value}")
            continue
        for key, value in table.items():
            ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0) if field == "rank_pattern" \
                else (_number(value) and value > 0)
            if not ok:
                kind = "integer" if want == "r" else "number"
                problems.append(f"{field}[{key!r}]={value!r} is not a positive {kind}")
            problems += _syntax(f"{field} key {key!r}", rf"(.*\.)?({key})$")
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if value is None or _strings(value):
            continue
        if not isinstance(value, str):
            bad(field, "a regex string or a list of module names")
        elif value != ALL_LINEAR:
            problems += _syntax(field, value)
    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if layers is not None and not _index(layers) and not (isinstance(layers, list) and all(map(_index, layers))):
        bad("layers_to_transform", "a layer index or a list of them")
    if pattern is not None and not isinstance(pattern, str) and not _strings(pattern):
        bad("layers_pattern", "a string or a list of strings")
    elif pattern:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            problems += _syntax(f"layers_pattern {p!r}", _layer_pattern(p))
    if problems:
        raise _error("the PEFT adapter config is malformed:\n  - " + "\n  - ".join(problems[:20]), where)


def _syntax(field: str, pattern: str) -> list[str]:
    try:
        patterns.check_syntax(pattern)
    except re.error as e:
        return [f"{field} is not a valid regex: {e}"]
    return []


def _layer_pattern(pattern: str) -> str:
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def pattern_key(table: dict, module: str, field: str, where: str) -> str | None:
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", module), else None."""
    for key in table:
        if _bounded(patterns.match, rf"(.*\.)?({key})$", module, f"{field} key {key!r}", where):
            return key
    return None


def not_targeted(config: dict, module: str, where: str) -> str | None:
    """None when PEFT would put a LoRA on `module` by this config (check_target_module_exists), else why not.

    target_modules=None or "all-linear" depend on the model's module types, not names: not checked here."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and exclude:
        if _bounded(patterns.fullmatch, exclude, module, "exclude_modules", where):
            return f"exclude_modules={exclude!r} excludes it"
    elif exclude and (module in exclude or any(module.endswith(f".{e}") for e in exclude)):
        return f"exclude_modules lists it ({exclude!r})"
    targets = config.get("target_modules")
    if targets is None or targets == ALL_LINEAR:
        return None
    if isinstance(targets, str):
        found = _bounded(patterns.fullmatch, targets, module, "target_modules", where)
        return None if found else f"target_modules={targets!r} does not match it"
    if module in targets:
        return None  # named in full: PEFT takes it whatever layers_to_transform says
    if not any(module.endswith(f".{t}") for t in targets):
        return f"target_modules={targets!r} does not name it"
    layers, layers_pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if layers is None or layers == []:
        return None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)  # fixed pattern: linear time
    else:
        match = None
        for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = _bounded(patterns.match, _layer_pattern(p), module, f"layers_pattern {p!r}", where)
            if match is not None:
                break
    if match is None:
        return f"layers_to_transform={layers!r} is set and its name has no layer index"
    index = int(match.group("idx"))
    if index == layers or (isinstance(layers, list) and index in layers):
        return None
    return f"it is in layer {index}, and layers_to_transform={layers!r}"


def _bounded(matcher, pattern: str, name: str, field: str, where: str):
    try:
        return matcher(pattern, name)
    except patterns.SlowPattern as e:
        raise _error(f"{field} is unusable: {e}", where, patterns.SLOW_FIX) from None
