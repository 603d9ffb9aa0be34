"""HF PEFT LoRA adapters, both ways, without importing peft.

    adapted = lora_fx.load_peft_adapter(model, "peft_dir", example_inputs=(ids,),
                                        example_kwargs={"use_cache": False}, frontend="export")
    merged = lora_fx.fold(adapted)                     # equals PeftModel.merge_and_unload()'s weights
    lora_fx.save_peft_adapter(adapted, "out_dir")      # PeftModel.from_pretrained(model, "out_dir") loads it

PEFT's folder: `adapter_config.json` (peft_type "LORA", r, lora_alpha, use_rslora, rank_pattern, alpha_pattern,
target_modules, fan_in_fan_out, ...) and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r); delta W = s · B @ A,
transposed for GPT-2's Conv1D (fan_in_fan_out), s = alpha / r or alpha / sqrt(r) (use_rslora).

The LoRA modules come from the tensor names (PEFT saves exactly the modules it adapted), their r from the tensor
shapes checked against r / rank_pattern, their alpha from lora_alpha / alpha_pattern with PEFT's own matching
(first key k with re.match(rf"(.*\\.)?({k})$", module name)); each module must be one the config's target_modules /
exclude_modules / layers_to_transform select (lora_fx.peft_config checks the config itself). modules_to_save come
back as modules trained in full. Variants that change the math or the base weights (DoRA, biases, PiSSA-style inits,
trainable token indices, ...) are refused with AdapterFileError, never silently dropped.
"""

from __future__ import annotations

import glob as globlib
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_fx import peft_config
from lora_fx.adapter_file import (DEFAULT_ADAPTER, check_and_copy, full_tensors, modules_in_full,
                                  read_json,
                                  read_safetensors, sites_by_weight, write_json, write_safetensors)
from lora_fx.atomic import atomic_write_dir
from lora_fx.errors import AdapterFileError, RuleError
from lora_fx.passes.infra import dtensor_type
from lora_fx.peft_config import PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN
from lora_fx.peft_experts import BASE_LAYER, from_peft, parameter_of, peft_layout, strip_base_layer, to_peft, \
    targeted_in_order, wrapper_path
from lora_fx.rollback import unchanged_on_error
from lora_fx.site_kinds import kind_of
from lora_fx.state import adapter_container

PREFIX = "base_model.model."
KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
# an embedding's LoRA is a pair of bare parameters in PEFT: <module>.lora_embedding_A (r, num_embeddings), _B (dim, r)
EMBEDDING_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?$")
# the base weight of an adapted embedding or output layer, which save_pretrained's save_embedding_layers="auto"
# (its default) stores beside the LoRA in case the vocabulary was resized
BASE_WEIGHT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")

# Config fields whose non-empty value means something lora_fx cannot reproduce (a different layer or extra weights).
_UNSUPPORTED = {
    "use_dora": "DoRA (a learned magnitude vector per output)",
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QA-LoRA",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "megatron_config": "Megatron parallel layers",
}
# init_lora_weights values that change the base weights when the adapter is created: the adapter only makes sense
# with that modified base (PEFT converts such adapters to plain LoRA with path_initial_model_for_weight_conversion).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga", "orthogonal")


def read_peft_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, dict[str, Any]]]:
    """(config, {module path: {"lora_A": tensor, "lora_B": tensor, "r": int, "alpha": float, "scaling": str,
    "dropout": float}}) of a PEFT LoRA folder; refuses what lora_fx cannot reproduce exactly."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise AdapterFileError("the PEFT adapter folder does not exist" if not path.exists() else
                               "the PEFT adapter path is not a folder", where=str(path),
                               fix="give the folder PeftModel.save_pretrained wrote (it holds adapter_config.json)")
    config = read_json(path / PEFT_CONFIG)
    where = str(path / PEFT_CONFIG)
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"not a PEFT LoRA adapter: peft_type={config.get('peft_type')!r}", where=where,
                               fix="lora_fx reads PEFT adapters of type LORA only"
                               + ("; this is a lora_fx adapter: use lora_fx.load_adapter / adapt_from_adapter"
                                  if config.get("format") == "lora_fx.adapter" else ""))
    refused = [f"{k}={config[k]!r} ({why})" for k, why in _UNSUPPORTED.items() if config.get(k)]
    if config.get("bias", "none") not in ("none", None):
        refused.append(f"bias={config['bias']!r} (trained biases)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        refused.append(f"init_lora_weights={init!r} (this init changes the base weights; the adapter does not apply "
                       f"to the original model)")
    if refused:
        raise AdapterFileError("the PEFT adapter uses features lora_fx does not support: " + "; ".join(refused),
                               where=where, fix="train a plain LoRA adapter (use_dora=False, bias='none'; "
                                                "modules_to_save is fine), or merge it with PEFT's merge_and_unload")
    peft_config.check_fields(config, where)
    if not (path / PEFT_WEIGHTS).is_file():
        fix = ("this adapter is saved as a pickle (adapter_model.bin), which lora_fx never loads: re-save it with "
               "PeftModel.save_pretrained(dir, safe_serialization=True)") if (path / PEFT_WEIGHTS_BIN).exists() else \
            "give the folder PeftModel.save_pretrained wrote"
        raise AdapterFileError(f"{PEFT_WEIGHTS} is missing", where=str(path), fix=fix)
    tensors = read_safetensors(path / PEFT_WEIGHTS)

    modules: dict[str, dict[str, Any]] = {}
    odd, adapters, full = [], set(), {}
    saved = config.get("modules_to_save") or []
    if not (isinstance(saved, list) and all(isinstance(name, str) and name for name in saved)):
        raise AdapterFileError(f"modules_to_save={saved!r} is not a list of module names", where=where,
                               fix="save the adapter again with PeftModel.save_pretrained")
    base_weights = {}
    for key, t in tensors.items():
        m = KEY.match(key) or EMBEDDING_KEY.match(key)
        name = key.removeprefix(PREFIX)
        if m is None and BASE_WEIGHT_KEY.match(key):
            base_weights[BASE_WEIGHT_KEY.match(key).group("module") + ".weight"] = t
            continue
        if m is None and _trained_in_full(name, saved):  # a module PEFT trains in full: its own weights
            full[name] = t
            continue
        if m is None:
            odd.append(key)
            continue
        adapters.add(m.group("adapter"))
        part = m.group("part") if m.re is KEY else f"lora_{m.group('part')}"
        modules.setdefault(m.group("module"), {})[part] = t
    if odd:
        raise AdapterFileError(f"the PEFT adapter holds tensors that are not plain LoRA A/B weights: {sorted(odd)[:10]}"
                               + (" ..." if len(odd) > 10 else ""), where=str(path / PEFT_WEIGHTS),
                               fix="lora_fx loads plain LoRA on linear, convolution and embedding layers and the "
                                   "modules the config lists in modules_to_save (no DoRA magnitudes or biases)")
    if len(adapters) > 1:
        raise AdapterFileError(f"the file mixes several adapters: {sorted(map(str, adapters))}", where=str(path),
                               fix="save each adapter into its own folder with PeftModel.save_pretrained")
    if not modules:
        raise AdapterFileError("the PEFT adapter holds no LoRA weights", where=str(path / PEFT_WEIGHTS),
                               fix="save the adapter again with PeftModel.save_pretrained")

    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    scaling = "rslora" if config.get("use_rslora") else "standard"
    dropout = float(config.get("lora_dropout") or 0.0)
    problems = []
    parameters = config.get("target_parameters") or []
    if parameters and not (isinstance(parameters, list) and all(isinstance(t, str) and t for t in parameters)):
        problems.append(f"target_parameters={parameters!r} is not a list of parameter names")
        parameters = []
    for module, parts in sorted(modules.items()):
        why_not = peft_config.not_targeted(config, module, where)
        if parameters and (why_not is not None or BASE_LAYER in module):
            # LoRA on a parameter of this module (target_parameters): which one, its E and r need the model
            # (load_peft_adapter resolves it with lora_fx.peft_experts)
            why_not = None
            parts["parameter"] = True
        if why_not is not None:
            problems.append(f"{module}: the file holds LoRA weights for it, but PEFT would not adapt it: {why_not}")
            continue
        if set(parts) - {"parameter"} != {"lora_A", "lora_B"}:
            problems.append(f"{module}: only {sorted(parts)} present")
            continue
        a, b = parts["lora_A"], parts["lora_B"]
        conv = a.dim() in (3, 4, 5) and b.dim() == a.dim() and all(k == 1 for k in b.shape[2:])
        if not (a.dim() == b.dim() == 2 or conv) or a.shape[0] != b.shape[1]:
            problems.append(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not (r, in) and "
                            f"(out, r) of one r (or a convolution's (r, in, *kernel) and (out, r, *1))")
            continue
        rk = peft_config.pattern_key(rank_pattern, module, "rank_pattern", where)
        r = rank_pattern[rk] if rk is not None else r0
        ak = peft_config.pattern_key(alpha_pattern, module, "alpha_pattern", where)
        alpha = alpha_pattern[ak] if ak is not None else alpha0
        if r != a.shape[0] and not parts.get("parameter"):
            problems.append(f"{module}: the config gives r={r} but lora_A has {a.shape[0]} rows")
        parts.update(r=int(a.shape[0]), alpha=float(alpha), scaling=scaling, dropout=dropout, config_r=int(r))
    if problems:
        raise AdapterFileError("the PEFT adapter is inconsistent:\n  - " + "\n  - ".join(problems[:20]),
                               where=str(path), fix="the files come from different saves or were edited: save the "
                                                    "adapter again with PeftModel.save_pretrained")
    config["lora_fx_modules_to_save"] = full  # {"classifier.weight": tensor, ...}: the modules trained in full
    config["lora_fx_base_weights"] = base_weights  # {"model.embed_tokens.weight": tensor}: checked against the model
    return config, modules


def _refuse_tied(model: nn.Module, modules: dict[str, Any], where: str) -> None:
    """A LoRA on a weight the model shares with another module (an lm_head tied to the embedding) cannot be folded
    without changing the other one too; say so, and how to untie, before tracing hides it behind other errors."""
    from lora_fx.plan import tied_weights

    tied = tied_weights(model)
    for module in modules:
        twins = tied.get(f"{module}.weight")
        if twins:
            leaf = f"model.{module}.weight"
            raise AdapterFileError(f"the PEFT adapter has a LoRA on {module}, whose weight this model shares with "
                                   f"{twins}: folding it would change {twins} too", where=where,
                                   fix=f"untie them in the model first: {leaf} = nn.Parameter({leaf}.detach().clone())"
                                       f" (and model.config.tie_word_embeddings = False for a transformers model), "
                                       f"then load the adapter")


def _check_base_weights(model: nn.Module, saved: dict[str, torch.Tensor], where: str) -> None:
    """Base weights PEFT saved beside the LoRA (save_embedding_layers) must be the model's own: lora_fx loads the
    LoRA onto the model as it is, so a resized or retrained embedding would silently not be there."""
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
    for name, t in saved.items():
        own = params.get(name)
        if own is None or own.shape != t.shape or not torch.equal(own.detach().cpu().to(t.dtype), t):
            what = "is not a parameter of this model" if own is None else (
                f"has shape {tuple(t.shape)} in the file, {tuple(own.shape)} in this model" if own.shape != t.shape
                else "differs from this model's")
            raise AdapterFileError(f"the PEFT adapter stores the base weight of {name} (save_embedding_layers), and "
                                   f"it {what}", where=where,
                                   fix="load it onto the model it was trained on (with its vocabulary resized the "
                                       "same way); lora_fx loads the LoRA, not base weights")


def _trained_in_full(name: str, saved: list[str]) -> bool:
    """Whether tensor `name` ("classifier.weight", "bert.pooler.dense.weight") belongs to a module PEFT's
    modules_to_save names, or to a submodule of one: PEFT wraps every module whose path ends with an entry (a plain
    string suffix: "norm" takes every "...layernorm" too)."""
    parts = name.split(".")[:-1]
    ancestors = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]  # its module, that module's parents, ...
    return any(module.endswith(entry) for module in ancestors for entry in saved)


def load_peft_adapter(model: nn.Module, peft_dir: str | os.PathLike, *, example_inputs: tuple | None = None,
                      example_kwargs: dict | None = None, frontend: str = "auto", **trace_options: Any):
    """Adapt `model` with the LoRA of a PEFT adapter folder (the modules, r, alpha and rsLoRA scaling it has) and
    load its weights. Returns the adapted GraphModule; lora_fx.fold(adapted) gives PEFT's merged weights.

    transformers models need frontend="export" (decoders with example_kwargs={"use_cache": False})."""
    from lora_fx.api import adapt_model
    from lora_fx.rules import Rule

    config, modules = read_peft_adapter(peft_dir)
    full = config.pop("lora_fx_modules_to_save")
    _refuse_tied(model, modules, str(peft_dir))
    _check_base_weights(model, config.pop("lora_fx_base_weights"), str(peft_dir))
    parameters = _resolve_parameters(model, config, modules, str(peft_dir))  # file path -> (weight, num_experts)
    rules = []
    for module, s in modules.items():
        kwargs = {"r": s["r"], "alpha": s["alpha"], "scaling": s["scaling"]}
        if module in parameters:
            kwargs["r"] = s["r"] // max(parameters[module][1], 1)
        if s["dropout"] > 0 and module not in parameters:
            kwargs["dropout"] = s["dropout"]
        name = parameters[module][0] if module in parameters else module
        rules.append(Rule(glob=globlib.escape(name), **kwargs))  # the whole module (or parameter) name, nothing else
    with unchanged_on_error(model):  # a refused adapter leaves the model as it was (requires_grad, modes)
        try:
            adapted = adapt_model(model, rules, example_inputs=example_inputs, example_kwargs=example_kwargs,
                                  frontend=frontend, fit_rank=False, modules_to_save=modules_in_full(full),
                                  **trace_options)
        except RuleError as e:
            raise AdapterFileError(f"the PEFT adapter does not fit this {type(model).__name__}: {e.what}",
                                   where=str(peft_dir) + (f" ({e.where})" if e.where else ""),
                                   fix="load it onto the model it was trained on "
                                       f"({config.get('base_model_name_or_path') or 'see base_model_name_or_path'})"
                                   ) from e
        gm, container, state = adapter_container(adapted)
        # a file entry is a module (target_modules) or a parameter (target_parameters, one module may hold several)
        by_parameter = {weight: path for path, (weight, _) in parameters.items()}
        entry_of = {w: by_parameter.get(w, site.module) for w, site in sites_by_weight(state).items()}
        by_entry: dict[str, list[str]] = {}
        for lora in container.values():
            by_entry.setdefault(entry_of.get(lora.weight_name, ""), []).append(lora.weight_name)
        not_found = sorted(m for m in modules if m not in by_entry)
        several = {m: ws for m, ws in by_entry.items() if len(ws) > 1}
        if not_found or several:
            raise AdapterFileError(
                "the PEFT adapter does not fit this model's graph: "
                + (f"no linear-like site for modules {not_found}" if not_found else "")
                + ("; " if not_found and several else "")
                + (f"modules with several LoRA weights (PEFT adapts one weight per module): {several}" if several else ""),
                where=str(peft_dir),
                fix="load it onto the model it was trained on; transformers models need frontend='export'")
        tensors = {f"{m}.{p}": s[p] for m, s in modules.items() for p in ("lora_A", "lora_B")}
        layouts = {lora.weight_name: lora.weight_layout for lora in container.values()}
        for path, (weight, experts) in parameters.items():
            a, b = from_peft(modules[path]["lora_A"], modules[path]["lora_B"], experts, peft_layout(model, weight),
                             layouts[weight])
            tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = a, b
        check_and_copy(gm, container, tensors, source=str(peft_dir), strict=True,
                       key_of=lambda weight, part: f"{entry_of[weight]}.{part}", full=full)
        return adapted


def _resolve_parameters(model: nn.Module, config: dict, modules: dict, where: str) -> dict[str, tuple[str, int]]:
    """{file path: (parameter name, num_experts or 0 for a 2-D weight)} for the target_parameters LoRA of a file,
    found in the model by PEFT's nesting rule (lora_fx.peft_experts); r checked against the config's."""
    found, problems = {}, []
    for path, s in modules.items():
        if not s.get("parameter"):
            continue
        weight = parameter_of(model, path, config.get("target_parameters") or [])
        if weight is None:
            why = peft_config.not_targeted(config, strip_base_layer(path), where)
            problems.append(f"{path}: PEFT would not adapt it ({why or 'no parameter of it is in target_parameters'})")
            continue
        w = model.get_parameter(weight)
        experts = int(w.shape[0]) if w.dim() == 3 else 0
        rows = s["lora_A"].shape[0]
        e = max(experts, 1)
        if w.dim() not in (2, 3) or rows % e or rows // e != s["config_r"]:
            problems.append(f"{path}: lora_A {tuple(s['lora_A'].shape)} is not (r·E, in) with r={s['config_r']} and "
                            f"E={e} for {weight} {tuple(w.shape)}")
            continue
        found[path] = (weight, experts)
    if problems:
        raise AdapterFileError("the PEFT adapter's target_parameters LoRA does not fit this model:\n  - "
                               + "\n  - ".join(problems[:20]), where=where,
                               fix="load it onto the model it was trained on")
    return found


def _anchored(name: str) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", name): a leading "^" stops the prefix, so the key
    # selects exactly this module.
    return "^" + re.escape(name)


@dataclass
class _PeftEntry:
    module: str
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    r: int
    alpha: float
    rslora: bool
    dropout: float
    layout: str
    name: str = ""  # a target_parameters entry: the parameter's name (module is then PEFT's wrapper path)


def _combine_slices(module: str, loras: list) -> _PeftEntry:
    """Row-sliced LoRAs of one packed weight (q and v of GPT-2's c_attn) as ONE whole-weight LoRA of rank sum(r):
    A = [A_q; A_v], B = [[s_q·B_q, 0], [0, s_v·B_v]] placed at their rows, scale 1 (alpha = r). delta W is the same
    (each slice's scale is folded into its B, so the result differs from lora_fx's only by fp32 rounding)."""
    out = loras[0].out_features
    r_total = sum(l.r for l in loras)
    A = torch.cat([l.lora_A.detach().float().cpu() for l in loras], 0)
    B = torch.zeros(out, r_total)
    col = 0
    for l in loras:
        rows = torch.tensor([i for a, b in l.rows for i in range(a, b)], dtype=torch.long)
        B[rows, col:col + l.r] = l.lora_B.detach().float().cpu() * l.scaling
        col += l.r
    dropouts = {l.dropout.p if isinstance(l.dropout, nn.Dropout) else 0.0 for l in loras}
    return _PeftEntry(module, A.to(loras[0].lora_A.dtype), B.to(loras[0].lora_B.dtype), r_total, float(r_total),
                      False, max(dropouts), loras[0].weight_layout)


def _parameter_entries(model: nn.Module, loras: list) -> list[_PeftEntry]:
    """PEFT target_parameters entries for LoRA on bare parameters: A and B in PEFT's layout, under the path of the
    wrapper PEFT nests for each parameter of a module (lora_fx.peft_experts)."""
    chosen = {lora.weight_name for lora in loras}
    out = []
    for lora in loras:
        module, _, name = lora.weight_name.rpartition(".")
        names = targeted_in_order(model, module, lambda w: w in chosen)
        a, b = to_peft(lora.lora_A.detach(), lora.lora_B.detach(), peft_layout(model, lora.weight_name),
                       lora.weight_layout)
        out.append(_PeftEntry(wrapper_path(module, names, name), a, b, lora.r, lora.alpha,
                              lora.scaling_kind == "rslora", 0.0, lora.weight_layout, name=lora.weight_name))
    return out


def save_peft_adapter(adapted: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None, adapter: str = DEFAULT_ADAPTER) -> Path:
    """Write a folder that PEFT loads with PeftModel.from_pretrained(base_model, directory).

    Only LoRA on the module types PEFT adapts (lora_fx.site_kinds: nn.Linear, GPT-2 Conv1D, nn.Conv1d/2d,
    nn.Embedding) can be written; other sites (F.linear or matmul on a bare parameter) have no PEFT equivalent and
    are refused. Row slices of a packed weight (LoRA on q and v of a fused qkv) are
    written as one LoRA of rank sum(r) with the same delta W. rsLoRA weights mixed with standard ones are written
    with an equivalent alpha (alpha·sqrt(r)). The write is atomic like save_adapter's.
    adapter: which named adapter to write (lora_fx.add_adapter); PEFT loads it as its "default"."""
    gm, container, state = adapter_container(adapted, adapter, what="save a PEFT adapter from")
    dtensor = dtensor_type()
    if dtensor is not None and any(isinstance(p, dtensor) for p in container.parameters()):
        raise AdapterFileError("the LoRA weights are sharded DTensors (FSDP2 fully_shard); save_peft_adapter does not "
                               "gather them", where=type(gm).__name__,
                               fix="save with lora_fx.adapter_file.save_adapter on every rank, or gather a full state "
                                   "dict into a plain adapted copy and save that")
    sites = sites_by_weight(state)
    by_module: dict[str, list] = {}
    problems, on_parameters = [], []
    for lora in container.values():
        site = sites.get(lora.weight_name)
        module = site.module if site else lora.weight_name.rpartition(".")[0]
        module_type = site.module_type if site else "?"
        peft_types = kind_of(site).peft_types if site else ()
        if site and _linear_subclass(gm, module):  # PEFT adapts any nn.Linear (Falcon's FalconLinear: x @ W.T)
            module_type = "Linear"
        bare = site is not None and kind_of(site).name in ("experts", "linear") and not lora.rows \
            and lora.output_rows is None and lora.weight_name.rpartition(".")[0] == module != ""  # PEFT wraps the
        # module that owns a targeted parameter, so it cannot target the top-level module's own parameters
        if (module_type not in peft_types or lora.weight_name != f"{module}.weight") and bare:
            on_parameters.append(lora)  # PEFT's target_parameters (an expert weight, F.linear on a bare parameter)
            continue
        if module_type not in peft_types or lora.weight_name != f"{module}.weight":
            problems.append(f"{lora.weight_name} (a {site.op if site else '?'} site on a {module_type})")
            continue
        if tuple(getattr(lora, "dilation", None) or (1,)) not in ((1,), (1,) * len(getattr(lora, "kernel_size", ()))):
            problems.append(f"{lora.weight_name} (a dilated convolution: PEFT's LoRA conv has no dilation)")
            continue
        by_module.setdefault(module, []).append(lora)
    if problems:
        raise AdapterFileError("PEFT can only hold LoRA on the modules it adapts (Linear, Conv1D, Conv1d/2d, "
                               "Embedding) and on whole parameters of submodules (target_parameters); these LoRA "
                               f"weights have no PEFT equivalent: {problems}",
                               where=type(gm).__name__,
                               fix="save with lora_fx.save_adapter instead, or adapt only those modules")
    entries = []
    for module, loras in by_module.items():
        if len(loras) == 1 and not getattr(loras[0], "rows", ()):
            l = loras[0]
            entries.append(_PeftEntry(module, l.lora_A.detach(), l.lora_B.detach(), l.r, l.alpha,
                                      l.scaling_kind == "rslora",
                                      l.dropout.p if isinstance(l.dropout, nn.Dropout) else 0.0, l.weight_layout))
        elif all(getattr(l, "rows", ()) for l in loras):
            entries.append(_combine_slices(module, loras))
        else:
            raise AdapterFileError(f"{module} has a whole-weight LoRA and row slices at once", where=module,
                                   fix="save with lora_fx.save_adapter instead")

    entries += _parameter_entries(gm, on_parameters)
    all_rslora = all(e.rslora for e in entries)

    def alpha_of(e: _PeftEntry) -> float | int:
        # one use_rslora flag for the whole file: write rsLoRA weights among standard ones as standard with an alpha
        # giving the same scale (alpha·sqrt(r) / r == alpha / sqrt(r))
        a = e.alpha if all_rslora or not e.rslora else e.alpha * math.sqrt(e.r)
        return int(a) if float(a).is_integer() else float(a)

    pairs = Counter((e.r, alpha_of(e)) for e in entries)
    (r0, alpha0), _ = max(pairs.items(), key=lambda kv: kv[1])
    rank_pattern = {_anchored(e.name or e.module): e.r for e in entries if e.r != r0}
    alpha_pattern = {_anchored(e.name or e.module): alpha_of(e) for e in entries if alpha_of(e) != alpha0}
    layouts = {e.layout for e in entries if not e.name}
    parameters = sorted(e.name for e in entries if e.name)
    if parameters and layouts == {"in_out"}:
        raise AdapterFileError("PEFT cannot hold LoRA on GPT-2 Conv1D modules (fan_in_fan_out) and on parameters "
                               "(target_parameters) in one adapter", where=type(gm).__name__,
                               fix="save with lora_fx.save_adapter instead, or adapt only one of the two")
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": alpha0,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": all_rslora,
        # re.fullmatch on the module name: exactly these modules
        "target_modules": "|".join(f"(?:{re.escape(e.module)})" for e in sorted(entries, key=lambda e: e.module)
                                   if not e.name) or [],  # [] (not None, which PEFT fills from the model type)
        "target_parameters": parameters or None,
        "exclude_modules": None,
        "fan_in_fan_out": layouts == {"in_out"},  # PEFT corrects it per module (Conv1D in_out, Linear out_in)
        # PEFT has one dropout; only matters for training; PEFT's target_parameters LoRA refuses any
        "lora_dropout": 0.0 if parameters else max(e.dropout for e in entries),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": list(state.modules_to_save) or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    embeddings = {m for m, loras in by_module.items() if kind_of(sites[loras[0].weight_name]).name == "embedding"}
    tensors = {}
    for e in entries:
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if e.module in embeddings else \
            ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{e.module}.{a_key}"] = e.A.to("cpu").contiguous().clone()
        tensors[f"{PREFIX}{e.module}.{b_key}"] = e.B.to("cpu").contiguous().clone()

    tensors.update({f"{PREFIX}{name}": t for name, t in full_tensors(gm, state).items()})

    def write(tmp: Path) -> None:
        write_safetensors(tensors, tmp / PEFT_WEIGHTS, {"format": "pt"})
        write_json(config, tmp / PEFT_CONFIG)

    written = atomic_write_dir(directory, write, owned=(PEFT_WEIGHTS, PEFT_CONFIG, "README.md"))
    _warn_if_quantized_base(state, directory)
    return written


def _linear_subclass(root: nn.Module, module: str) -> bool:
    """Whether `module` is an nn.Linear of another class: PEFT wraps it as a Linear whatever its forward does."""
    try:
        owner = root.get_submodule(module) if module else None
    except AttributeError:
        return False
    return isinstance(owner, nn.Linear) and type(owner) is not nn.Linear


def _warn_if_quantized_base(state: Any, directory: Any) -> None:
    """A PEFT config has no field for the base a LoRA was trained against: say what a PEFT user must load it onto."""
    if not state.quantized:
        return
    first = next(iter(state.quantized.values()))
    loftq = any(r.lora_init == "loftq" for r in state.quantized.values())
    onto = "bitsandbytes 4-bit NF4 with double quantization" if first.kind == "nf4" else "an FP8 base"
    warnings.warn(f"the LoRA in {directory} was trained against a {first.kind} base ({len(state.quantized)} weights"
                  f"{', LoftQ init' if loftq else ''}); PEFT loads it onto whatever base it is given: load it onto "
                  f"the base quantized the same way ({onto}), or merge with lora_fx.fold (the dequantized fold); on "
                  f"the unquantized base its outputs differ by the quantization error"
                  f"{' twice over (the LoRA holds that error)' if loftq else ''}", UserWarning, stacklevel=3)
