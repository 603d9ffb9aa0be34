"""Adapter files: only the LoRA weights (A and B) and what is needed to rebuild them, as safetensors + JSON.

    lora_fx.save_adapter(adapted, "run/adapter")             # adapter.safetensors + adapter_config.json
    lora_fx.load_adapter(fresh_adapted, "run/adapter")       # checks every name and shape, then copies
    adapted = lora_fx.adapt_from_adapter(model, "run/adapter", example_inputs=(x,))   # rules rebuilt from the file

Tensors are keyed by the base weight's qualified name ("layers.0.q.weight.lora_A" (r, in), "... .lora_B" (out, r);
a LoRA on row slices of a packed weight adds its rows: "h.0.attn.c_attn.weight[0:64].lora_B" (rows, r)), so a file
depends neither on the front end that traced the model nor on lora_fx's internal module keys.
Nothing is ever unpickled: tensors are read with safetensors, settings with json.

Under FSDP2 (torch.distributed.fsdp.fully_shard) A and B are sharded DTensors: save_adapter is then a collective
that every rank calls (each tensor is gathered whole, and rank 0 writes), as torch.distributed.checkpoint's
get_model_state_dict(full_state_dict=True) is; load_adapter gives each rank its own shard of the file's tensors.

A save is atomic: both files are written into a temporary folder beside the target, flushed to disk, and the folder
then takes the target's place in one step (an atomic directory exchange on Linux). A save that fails or is killed
leaves the previous adapter as it was; a failed save removes its temporary folder, and the temporary folder of a
killed save is removed by the next save into the same parent folder. A folder given as a symbolic link is saved
into the folder the link points to (the link stays); a read-only parent or old folder is refused before anything
changes.
"""

from __future__ import annotations

import glob as globlib
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable

import safetensors
import safetensors.torch
import torch
from torch import nn

from lora_fx import quantize
from lora_fx.atomic import atomic_write_dir
from lora_fx.errors import AdapterFileError, LoraFxError, RuleError, TraceError
from lora_fx.passes.infra import dtensor_type
from lora_fx.peft_config import PEFT_WEIGHTS
from lora_fx.rollback import unchanged_on_error
from lora_fx.rules import _is_int
from lora_fx.site import IN_OUT, OUT_IN
from lora_fx.site_kinds import KINDS, kind_of
from lora_fx.state import DEFAULT, adapter_container

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "lora_fx.adapter"
FORMAT_VERSION = 1
DEFAULT_ADAPTER = DEFAULT
TRAINER_FILE = "model.safetensors"  # save_pretrained's trainable state, for transformers' Trainer
TRAINER_MARK = "lora_fx_trainable_state"  # its safetensors metadata key
FULL_PREFIX = "modules_to_save."  # tensors of the modules trained in full: "modules_to_save.classifier.weight"


# ------------------------------------------------------------------------------------------------ small helpers
def lora_id(lora: nn.Module) -> str:
    """The name of one LoRA in files: its base weight's name, plus the row ranges for a slice of a packed weight
    ("h.0.attn.c_attn.weight[0:64,128:192]": the q and v rows of GPT-2's fused qkv each get their own LoRA)."""
    rows = tuple(getattr(lora, "rows", ()) or ())
    if not rows:
        return lora.weight_name
    return f"{lora.weight_name}[{','.join(f'{a}:{b}' for a, b in rows)}]"


def b_rows(lora: nn.Module) -> int:
    """Rows of B: the updated rows of a slice, else out_features."""
    rows = tuple(getattr(lora, "rows", ()) or ())
    return sum(b - a for a, b in rows) if rows else lora.out_features


def sites_by_weight(state: Any) -> dict[str, Any]:
    """{weight name: its first Site} from the match pass (module, module type, op of every candidate weight)."""
    out = {}
    for site in getattr(state, "sites", None) or []:
        out.setdefault(site.weight, site)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any) -> torch.dtype | None:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def _version() -> str:
    return str(getattr(sys.modules.get("lora_fx"), "__version__", "unknown"))


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return getattr(value, "__name__", None) or str(value)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def write_json(data: dict, path: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


# ------------------------------------------------------------------------------------------------ reading files
def read_json(path: Path) -> dict:
    if not path.is_file():
        raise AdapterFileError(f"{path.name} is missing", where=str(path.parent), fix=_missing_fix(path.parent))
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{path.name} is not UTF-8 text: {e}", where=str(path),
                               fix="the file is corrupt: save the adapter again") from None
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path.name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                               where=str(path), fix="the file is corrupt or was edited by hand: fix the JSON or "
                                                    "save the adapter again") from None
    except RecursionError:
        raise AdapterFileError(f"{path.name} nests lists or objects too deeply to be read", where=str(path),
                               fix="the file is corrupt or was edited by hand: save the adapter again") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path.name} holds a JSON {type(data).__name__}, not an object", where=str(path),
                               fix="the file is corrupt: save the adapter again")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on CPU). Truncated or corrupt files raise AdapterFileError."""
    if not path.is_file():
        raise AdapterFileError(f"{path.name} is missing", where=str(path.parent), fix=_missing_fix(path.parent))
    try:
        return dict(safetensors.torch.load_file(str(path), device="cpu"))
    except Exception as e:  # SafetensorError (truncated, bad header), OSError, unsupported dtype
        raise AdapterFileError(f"{path.name} is truncated or corrupt: {type(e).__name__}: {e}", where=str(path),
                               fix="the file was cut short or damaged (an interrupted copy?): copy or save it again"
                               ) from None


def _missing_fix(directory: Path) -> str:
    if (directory / PEFT_WEIGHTS).is_file():
        return "this folder holds a PEFT adapter: load it with lora_fx.load_peft_adapter(model, directory, ...)"
    if not directory.exists():
        return "the folder does not exist: check the path"
    return "give the folder that lora_fx.save_adapter wrote"


# ------------------------------------------------------------------------------------------------ checking and copying
@dataclass
class LoadReport:
    """What load_adapter did: the weights whose LoRA was loaded, and (strict=False) what it skipped."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # adapted in the model, absent from the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not adapted in the model


def _shape(t: torch.Tensor) -> tuple:
    return tuple(int(s) for s in t.shape)


def _meaning(lora: nn.Module) -> dict[str, str]:
    """What the dims of A and B are, for messages."""
    kernel = len(getattr(lora, "kernel_size", ()))
    if kernel:
        return {"lora_A": f"(r, in{', k' * kernel})", "lora_B": f"(out, r{', 1' * kernel})"}
    return {"lora_A": "(r, in)", "lora_B": "(rows, r)" if getattr(lora, "rows", ()) else "(out, r)"}


def modules_in_full(tensors: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The modules whose weights a file holds whole ({"classifier.weight": ...} -> ("classifier",))."""
    return tuple(dict.fromkeys(name.rpartition(".")[0] for name in tensors))


def full_tensors(adapted: nn.Module, state: Any) -> dict[str, torch.Tensor]:
    """The parameters of the modules trained in full, by their names in the model, for a file."""
    out = {}
    for module in getattr(state, "modules_to_save", ()):
        for name, p in adapted.get_submodule(module).named_parameters():
            out[f"{module}.{name}"] = p.detach().to("cpu").contiguous().clone()
    return out


def check_and_copy(adapted_gm: nn.Module, container: nn.ModuleDict, tensors: dict[str, torch.Tensor], *,
                   source: str, strict: bool = True, settings: dict[str, dict] | None = None,
                   key_of: Callable[[str, str], str] = lambda weight, part: f"{weight}.{part}",
                   full: dict[str, torch.Tensor] | None = None) -> LoadReport:
    """Check `tensors` against the adapted model's LoRA modules, then copy them. Nothing is copied unless all fit.

    `key_of(lora id, "lora_A"|"lora_B")` names a LoRA's tensors in `tensors` (lora_id: the weight's name, with row
    ranges for a slice); `settings` (lora id -> r/alpha/scaling as saved) is checked against the model's LoRAs."""
    by_weight = {lora_id(lora): lora for lora in container.values()}
    expected_keys = {key_of(w, part): (w, part) for w in by_weight for part in ("lora_A", "lora_B")}
    problems: list[str] = []
    present = [w for w in by_weight if any(key_of(w, p) in tensors for p in ("lora_A", "lora_B"))]
    missing = [w for w in by_weight if w not in present]
    unexpected_keys = sorted(k for k in tensors if k not in expected_keys)
    half = [key_of(w, p) for w in present for p in ("lora_A", "lora_B") if key_of(w, p) not in tensors]
    if half:
        problems.append(f"the file has only one of lora_A/lora_B for some weights; missing tensors: {half}")
    if strict and missing:
        problems.append(f"missing weights (adapted in the model, not in the file): {missing}")
    if strict and unexpected_keys:
        problems.append(f"extra weights (in the file, not adapted in the model): {unexpected_keys}")

    copies = []
    for w in present:
        lora = by_weight[w]
        expected = {"lora_A": _shape(lora.lora_A), "lora_B": _shape(lora.lora_B)}
        meaning = _meaning(lora)
        for part in ("lora_A", "lora_B"):
            key = key_of(w, part)
            t = tensors.get(key)
            if t is None:
                continue
            if not t.dtype.is_floating_point:
                problems.append(f"{key}: dtype {dtype_name(t.dtype)} is not a floating-point type")
                continue
            if _shape(t) != expected[part]:
                problems.append(f"{key}: shape {meaning[part]} expected {expected[part]}, found {_shape(t)}")
                continue
            if not torch.isfinite(t).all():
                problems.append(f"{key}: holds NaN or Inf")
                continue
            copies.append((getattr(lora, part), t))
        saved = (settings or {}).get(w)
        if saved:
            for name, mine in (("r", lora.r), ("alpha", lora.alpha), ("scaling", lora.scaling_kind)):
                if name in saved and saved[name] != mine and not (
                        isinstance(mine, float) and isinstance(saved[name], (int, float))
                        and math.isclose(saved[name], mine, rel_tol=1e-6)):
                    problems.append(f"{w}: {name}={saved[name]!r} in the file, {name}={mine!r} in the adapted model")
    for name, t in (full or {}).items():  # weights of the modules trained in full: the adapted model's own copies
        try:
            param = adapted_gm.get_parameter(name)
        except AttributeError:
            problems.append(f"{name}: the file trains it in full, the model has no such parameter")
            continue
        if _shape(t) != _shape(param) or not t.dtype.is_floating_point or not torch.isfinite(t).all():
            problems.append(f"{name}: a {dtype_name(t.dtype)} tensor of shape {_shape(t)} (finite: "
                            f"{bool(torch.isfinite(t).all())}) cannot replace the model's {_shape(param)}")
            continue
        copies.append((param, t))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise AdapterFileError(
            f"the adapter does not fit this {type(adapted_gm).__name__}; nothing was loaded:\n  - "
            + "\n  - ".join(shown), where=source,
            fix="adapt the same model with the same rules as when the adapter was saved (lora_fx.adapt_from_adapter "
                "does this from the file), or pass strict=False to load only the weights both have")
    dtensor = dtensor_type()
    with torch.no_grad():
        for param, t in copies:
            t = t.to(device=param.device, dtype=param.dtype)
            if dtensor is not None and isinstance(param, dtensor):  # FSDP2: every rank read the whole tensor and
                from torch.distributed.tensor import distribute_tensor  # keeps its own shard (no communication)
                t = distribute_tensor(t, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(t)
    return LoadReport(loaded=present, missing=missing, unexpected=unexpected_keys)


# ------------------------------------------------------------------------------------------------ public calls
def _weight_settings(container: nn.ModuleDict, state: Any) -> dict[str, dict]:
    sites = sites_by_weight(state)
    inits = {}
    for d in getattr(state, "decisions", []) or []:
        if d.adapted:
            inits.setdefault(d.site.weight, d.settings.init)
    out = {}
    for key, lora in container.items():
        site = sites.get(lora.weight_name)
        dropout = lora.dropout.p if isinstance(lora.dropout, nn.Dropout) else 0.0
        rows = [list(r) for r in (getattr(lora, "rows", ()) or ())]
        out[lora_id(lora)] = {
            "key": key,
            "weight": lora.weight_name,
            "rows": rows,
            # the roles a rule selected it by: a load rebuilds slices and split sites through them
            "role": _role_field(getattr(lora, "roles", ())),
            # the site reads only these rows of the weight (a split before F.linear)
            "site_rows": list(lora.output_rows) if getattr(lora, "output_rows", None) else None,
            "module": site.module if site else lora.weight_name.rpartition(".")[0],
            "module_type": site.module_type if site else None,
            "op": site.op if site else None,
            "r": lora.r, "alpha": lora.alpha, "scaling": lora.scaling_kind, "dropout": float(dropout),
            "init": inits.get(lora.weight_name),
            "layout": lora.weight_layout, "in_features": lora.in_features, "out_features": lora.out_features,
            "kind": kind_of(site).name if site else "linear",
            "kernel_size": list(getattr(lora, "kernel_size", ())) or None,
            "num_experts": getattr(lora, "num_experts", None),  # an expert weight: A (E, r, in), B (E, out, r)
            "dtype": dtype_name(lora.lora_A.dtype),
        }
    return out


def _role_field(roles: tuple[str, ...]) -> str | list[str] | None:
    return None if not roles else roles[0] if len(roles) == 1 else list(roles)


def save_adapter(adapted: nn.Module, directory: str | os.PathLike, *, adapter: str = DEFAULT_ADAPTER) -> Path:
    """Write `directory`/adapter.safetensors (every A and B, keyed "<base weight>.lora_A"/".lora_B") and
    `directory`/adapter_config.json (per-weight r/alpha/scaling/layout/shape/dtype, the rules, the defaults).

    Atomic: the previous adapter in `directory`, if any, is replaced in one step or not at all. Accepts the adapted
    module itself or a DDP / torch.compile wrapper of it. adapter: which named adapter to save (lora_fx.add_adapter).
    Returns the folder's path.

    Under torch.distributed: with DDP (every rank holds the whole A and B) call it on one rank only. With FSDP2
    (fully_shard: A and B are sharded DTensors) call it on every rank of the default process group, as
    torch.distributed.checkpoint's get_model_state_dict(full_state_dict=True): each tensor is gathered whole (a
    collective), rank 0 alone writes the folder, and every rank returns once it is written or raises
    AdapterFileError if rank 0 could not write it."""
    tensors, config, metadata, sharded = _adapter_contents(adapted, adapter)

    def write(tmp: Path) -> None:
        write_safetensors(tensors, tmp / WEIGHTS_FILE, metadata)
        write_json(_jsonable(config), tmp / CONFIG_FILE)

    if not sharded:
        return atomic_write_dir(directory, write, owned=(WEIGHTS_FILE, CONFIG_FILE, TRAINER_FILE))
    return _write_on_rank0(directory, write)


def _adapter_contents(adapted: nn.Module, adapter: str) -> tuple[dict, dict, dict, bool]:
    """(tensors, config, safetensors metadata, whether A and B are FSDP2-sharded) of an adapter file: every A and B
    gathered whole on the CPU, checked finite, and the settings."""
    gm, container, state = adapter_container(adapted, adapter, what="save an adapter from")
    weights = _weight_settings(container, state)
    dtensor = dtensor_type()
    sharded = dtensor is not None and any(isinstance(p, dtensor) for lora in container.values()
                                          for p in (lora.lora_A, lora.lora_B))
    tensors = {}
    for lora in container.values():
        for part in ("lora_A", "lora_B"):
            t = getattr(lora, part).detach()
            if sharded and isinstance(t, dtensor):
                t = t.full_tensor()  # a collective: every rank gathers every tensor, in the same order
            t = t.to("cpu").contiguous().clone()
            if not torch.isfinite(t).all():
                raise AdapterFileError(f"{part} of the LoRA on {lora.weight_name!r} holds NaN or Inf; nothing was "
                                       f"saved (load_adapter would refuse the file)", where=f"{lora_id(lora)}.{part}",
                                       fix="training diverged: lower the learning rate, use gradient clipping, or "
                                           "reload a good adapter")
            tensors[f"{lora_id(lora)}.{part}"] = t
    full = {FULL_PREFIX + name: t for name, t in full_tensors(gm, state).items()} if adapter == DEFAULT else {}
    tensors.update(full)
    rules, defaults = getattr(state, "rules", None), getattr(state, "defaults", None)
    # per adapter ({name: rules}) where the state keeps them so; a plain value belongs to the default adapter
    rules = rules.get(adapter) if isinstance(rules, dict) else (rules if adapter == DEFAULT_ADAPTER else None)
    defaults = defaults.get(adapter) if isinstance(defaults, dict) else (
        defaults if adapter == DEFAULT_ADAPTER else None)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_fx_version": _version(),
        "model": type(gm).__name__,
        "frontend": getattr(state, "frontend", None),
        "adapter": adapter,
        "weights": weights,
        "modules_to_save": list(state.modules_to_save) if full else [],
        "rules": None if rules is None else [r.to_dict() for r in rules],
        "defaults": None if defaults is None else _jsonable(defaults),
        "parameters": sum(t.numel() for t in tensors.values()),
        "quantized_base": quantize.adapter_record(state),  # what the LoRA was trained against (None: plain)
    }
    metadata = {"format": "pt", "lora_fx_format": FORMAT, "lora_fx_format_version": str(FORMAT_VERSION)}

    return tensors, config, metadata, sharded


def save_pretrained_files(adapted: nn.Module, directory: str | os.PathLike) -> Path:
    """The adapted model's save_pretrained: the adapter files written into `directory` (made if need be) beside what
    it already holds, each file atomically, as transformers' save_pretrained writes (Trainer saves a checkpoint into
    its output folder, which holds earlier checkpoints). Plus TRAINER_FILE: the trainable tensors (A, B, modules
    trained in full) under the adapted model's own state_dict names, which transformers' Trainer loads with
    load_state_dict(strict=False) to resume a run or for load_best_model_at_end; a TRAINER_FILE lora_fx did not
    write (a model's own weights) is never replaced. FSDP2-sharded adapters are saved as save_adapter does."""
    from lora_fx.atomic import atomic_file
    from lora_fx.state import adapted_state

    tensors, config, metadata, sharded = _adapter_contents(adapted, DEFAULT_ADAPTER)
    if sharded:
        return save_adapter(adapted, directory)
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise AdapterFileError("the path exists and is not a folder", where=str(path),
                               fix="give a folder path (it is created) or remove the file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterFileError(f"cannot create the folder: {e}", where=str(path),
                               fix="check the path and its permissions") from e
    owner, _ = adapted_state(adapted, what="save")
    trainable = {name: p.detach().to("cpu").contiguous().clone()
                 for name, p in owner.named_parameters() if p.requires_grad}
    files = [(WEIGHTS_FILE, lambda f: write_safetensors(tensors, f, metadata)),
             (CONFIG_FILE, lambda f: write_json(_jsonable(config), f))]
    if _ours_or_absent(path / TRAINER_FILE):
        files.append((TRAINER_FILE, lambda f: write_safetensors(trainable, f, {"format": "pt", TRAINER_MARK: "1"})))
    else:
        warnings.warn(f"lora_fx: {path / TRAINER_FILE} is not lora_fx's and was left as it is: transformers' Trainer "
                      f"cannot resume from this folder", stacklevel=3)
    for name, write in files:
        with atomic_file(path / name, AdapterFileError) as tmp:
            write(tmp / name)
    return path


def _ours_or_absent(file: Path) -> bool:
    """Whether `file` is missing or a trainable-state file lora_fx wrote (its safetensors metadata says so)."""
    if not file.exists():
        return not file.is_symlink()  # a link to nothing is not ours to replace
    try:
        with safetensors.safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get(TRAINER_MARK) == "1"
    except Exception:  # not a safetensors file at all: not ours
        return False


def _write_on_rank0(directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Rank 0 writes the adapter folder; every rank returns its path once written, or raises if rank 0 failed."""
    import torch.distributed as dist

    path, error = Path(directory).expanduser().absolute(), None
    if dist.get_rank() == 0:
        try:
            path = atomic_write_dir(directory, write, owned=(WEIGHTS_FILE, CONFIG_FILE, TRAINER_FILE))
        except AdapterFileError as e:
            error = e
    # a status tensor, not broadcast_object_list: nothing is unpickled, even between ranks
    on_cuda = "nccl" in str(dist.get_backend()) and torch.cuda.is_available()
    failed = torch.tensor([error is not None], dtype=torch.int32,
                          device=torch.device("cuda", torch.cuda.current_device()) if on_cuda else "cpu")
    dist.broadcast(failed, src=0)  # also the barrier: no rank returns before the folder is there
    if error is not None:
        raise error
    if failed.item():
        raise AdapterFileError("rank 0 could not write the adapter folder", where=str(path),
                               fix="read rank 0's AdapterFileError for the cause and its fix, then save again on every rank")
    return path


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a lora_fx adapter folder, checked for consistency with each other (not with a model)."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise AdapterFileError("the adapter folder does not exist" if not path.exists() else
                               "the adapter path is not a folder", where=str(path), fix=_missing_fix(path))
    config = read_json(path / CONFIG_FILE)
    where = str(path / CONFIG_FILE)
    if config.get("format") != FORMAT:
        peft = "peft_type" in config
        raise AdapterFileError(f"{CONFIG_FILE} is not a lora_fx adapter config (format={config.get('format')!r})",
                               where=where, fix="load it with lora_fx.load_peft_adapter(model, directory, ...)" if peft
                               else "give the folder that lora_fx.save_adapter wrote")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(f"adapter format version {version!r} is not supported (this lora_fx reads up to "
                               f"{FORMAT_VERSION})", where=where, fix="upgrade lora_fx to read this adapter")
    weights = config.get("weights")
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, dict) for v in weights.values()):
        raise AdapterFileError("the config lists no weights (\"weights\" must be a non-empty object)", where=where,
                               fix="the file is corrupt: save the adapter again")
    problems = []
    for w, s in weights.items():
        for key, kind in (("r", int), ("in_features", int), ("out_features", int), ("alpha", (int, float))):
            if not isinstance(s.get(key), kind) or isinstance(s.get(key), bool) or s.get(key) <= 0:
                problems.append(f"{w}: {key}={s.get(key)!r} is not a positive number")
        if s.get("scaling", "standard") not in ("standard", "rslora"):
            problems.append(f"{w}: unknown scaling {s.get('scaling')!r}")
        if "dtype" in s and (dtype_from_name(s["dtype"]) is None or not dtype_from_name(s["dtype"]).is_floating_point):
            problems.append(f"{w}: dtype {s['dtype']!r} is not a floating-point torch dtype")
        kernel = s.get("kernel_size") or []
        if not (isinstance(kernel, list) and all(isinstance(k, int) and not isinstance(k, bool) and k > 0
                                                  for k in kernel)):
            problems.append(f"{w}: kernel_size={kernel!r} is not a list of positive ints")
        rows = s.get("rows") or []
        if not (isinstance(rows, list) and all(_is_row_range(r) for r in rows)):
            problems.append(f"{w}: rows={rows!r} is not a list of [start, end] row ranges")
        if s.get("site_rows") is not None and not _is_row_range(s["site_rows"]):
            problems.append(f"{w}: site_rows={s['site_rows']!r} is not one [start, end] row range")
        problems += [f"{w}: {p}" for p in _field_problems(s)]
    if config.get("quantized_base") is not None:
        problems += quantize.record_problems(config["quantized_base"])
    if problems:
        raise AdapterFileError("the config is malformed:\n  - " + "\n  - ".join(problems[:20]), where=where,
                               fix="the file is corrupt or was edited by hand: save the adapter again")

    tensors = read_safetensors(path / WEIGHTS_FILE)
    saved = config.get("modules_to_save") or []
    if not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        raise AdapterFileError(f"modules_to_save={saved!r} is not a list of module names", where=where,
                               fix="the file is corrupt or was edited by hand: save the adapter again")
    listed = {f"{w}.{p}" for w in weights for p in ("lora_A", "lora_B")}
    listed |= {k for k in tensors if k.startswith(FULL_PREFIX) and k[len(FULL_PREFIX):].rpartition(".")[0] in saved}
    problems = []
    if set(tensors) - listed:
        problems.append(f"tensors not listed in {CONFIG_FILE}: {sorted(set(tensors) - listed)}")
    if listed - set(tensors):
        problems.append(f"tensors listed in {CONFIG_FILE} but missing from {WEIGHTS_FILE}: "
                        f"{sorted(listed - set(tensors))}")
    for w, s in weights.items():
        n_rows = sum(b - a for a, b in s.get("rows") or []) or s["out_features"]
        kernel = tuple(s.get("kernel_size") or ())  # a convolution's A has the layer's kernel, its B 1x1
        want = {"lora_A": (s["r"], s["in_features"], *kernel), "lora_B": (n_rows, s["r"], *(1,) * len(kernel))}
        experts = s.get("num_experts")
        if isinstance(experts, int) and not isinstance(experts, bool) and experts > 0:
            want = {part: (experts, *shape) for part, shape in want.items()}
        for part in ("lora_A", "lora_B"):
            t = tensors.get(f"{w}.{part}")
            if t is None:
                continue
            if _shape(t) != want[part]:
                problems.append(f"{w}.{part}: the config says shape {want[part]}, the tensor has {_shape(t)}")
            if "dtype" in s and dtype_name(t.dtype) != s["dtype"]:
                problems.append(f"{w}.{part}: dtype {dtype_name(t.dtype)} in {WEIGHTS_FILE}, {s['dtype']} in "
                                f"{CONFIG_FILE}")
    if problems:
        raise AdapterFileError(f"{WEIGHTS_FILE} and {CONFIG_FILE} do not agree:\n  - " + "\n  - ".join(problems[:20]),
                               where=str(path), fix="the two files come from different saves or were edited: "
                                                    "save the adapter again")
    return config, tensors


def load_adapter(adapted: nn.Module, directory: str | os.PathLike, *, strict: bool = True,
                 adapter: str = DEFAULT_ADAPTER) -> LoadReport:
    """Load a saved adapter into an adapted module (or a DDP / torch.compile wrapper of it).

    Every name, shape, dtype and setting is checked against the adapted graph before anything is copied; an
    AdapterFileError lists everything that does not fit. strict=False loads the weights both have and reports the
    rest in the returned LoadReport (shapes and settings must still fit). Tensors are cast to the LoRA's dtype.
    adapter: which named adapter of `adapted` receives the weights."""
    gm, container, state = adapter_container(adapted, adapter, what="load an adapter into")
    if adapter in (getattr(state, "merged", None) or []):
        raise AdapterFileError(f"adapter {adapter!r} is merged into the base weights: loading new A/B now would "
                               f"leave the merged W0 stale", where=str(directory),
                               fix="call lora_fx.unmerge_adapter(adapted) first, then load")
    config, tensors = read_adapter(directory)
    _warn_if_trained_on_another_base(config.get("quantized_base"), state, directory)
    lora, full = _split_full(tensors)
    missing = sorted(set(modules_in_full(full)) - set(getattr(state, "modules_to_save", ())))
    if missing:
        raise AdapterFileError(f"the adapter trains {missing} in full, and this adapted model does not",
                               where=str(directory), fix=f"adapt the model with modules_to_save={missing}, or use "
                                                         f"lora_fx.adapt_from_adapter, which does")
    loaded = check_and_copy(gm, container, lora, source=str(Path(directory)), strict=strict,
                            settings=config["weights"], full=full)
    quantize.mark_loftq(state, config.get("quantized_base"))
    return loaded


def _warn_if_trained_on_another_base(record: dict | None, state: Any, directory: Any) -> None:
    """load_adapter copies A and B whatever the base is; say so when it is not the base the LoRA was trained on."""
    have = quantize.adapter_record(state)
    base = lambda r: r and (r["kind"], r["block_size"], r["weights"])  # what makes two quantized bases the same
    if base(record) != base(have):
        trained = f"a {record['kind']} base ({len(record['weights'])} weights)" if record else "a plain base"
        here = f"a {have['kind']} base ({len(have['weights'])} weights)" if have else "a plain base"
        warnings.warn(f"the adapter in {directory} was trained against {trained}, this model has {here}: its "
                      f"outputs differ from the trained model's by the quantization error; lora_fx.adapt_from_adapter"
                      f" rebuilds the base it was trained against", UserWarning, stacklevel=3)


def _is_row_range(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(i) for i in value) and 0 <= value[0] < value[1]


def _field_problems(s: dict) -> list[str]:
    """What is wrong with the optional per-weight fields a load reads (beyond r/alpha/shapes, checked above)."""
    problems = []
    dropout = s.get("dropout")
    if dropout is not None and not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
                                    and 0 <= dropout < 1):
        problems.append(f"dropout={dropout!r} is not a probability in [0, 1)")
    if s.get("weight") is not None and not (isinstance(s["weight"], str) and s["weight"]):
        problems.append(f"weight={s['weight']!r} is not a parameter name")
    role = s.get("role")
    if role is not None and not (isinstance(role, str) and role or isinstance(role, list) and role
                                 and all(isinstance(r, str) and r for r in role)):
        problems.append(f"role={role!r} is not a role name or a list of them")
    experts = s.get("num_experts")
    if experts is not None and not (_is_int(experts) and experts > 0):
        problems.append(f"num_experts={experts!r} is not a positive int")
    if s.get("layout", OUT_IN) not in (OUT_IN, IN_OUT):
        problems.append(f"layout={s.get('layout')!r} is not {OUT_IN!r} or {IN_OUT!r}")
    if s.get("kind", "linear") not in KINDS:
        problems.append(f"kind={s.get('kind')!r} is not one of {sorted(KINDS)}")
    return problems


def _split_full(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the LoRA tensors, {parameter name: tensor} of the modules trained in full)."""
    full = {k[len(FULL_PREFIX):]: t for k, t in tensors.items() if k.startswith(FULL_PREFIX)}
    return {k: t for k, t in tensors.items() if not k.startswith(FULL_PREFIX)}, full


def rules_for_weights(weights: dict[str, dict], where: str = "adapter") -> list:
    """Rules that select exactly the saved weights (their whole qualified names), each with its saved settings.

    Row slices of a packed weight come back through their roles: one rule per slice, role=(the saved role), so
    slices trained with different r/alpha rebuild as they were."""
    from lora_fx.rules import Rule

    by_weight: dict[str, list[tuple[str, dict]]] = {}
    for lid, s in weights.items():
        by_weight.setdefault(s.get("weight") or lid, []).append((lid, s))
    rules = []
    for w, entries in by_weight.items():
        # A weight's LoRAs came from one rule without a role selector (one LoRA, or one per site that reads some
        # of its rows: nn.MultiheadAttention's cross-attention): one rule on the weight rebuilds them. Role slices of
        # a packed weight, or LoRAs that role rules chose: a rule each, selecting it by its recorded roles.
        by_role = any(s.get("role") for _, s in entries) and (
            len(entries) > 1 or any(s.get("rows") and not s.get("site_rows") for _, s in entries))
        settings = {(s["r"], float(s["alpha"]), s.get("scaling"), float(s.get("dropout") or 0)) for _, s in entries}
        sliced = any(s.get("rows") and not s.get("site_rows") for _, s in entries)
        if (by_role and not all(s.get("role") for _, s in entries)) or (not by_role and (sliced or len(settings) > 1)):
            raise AdapterFileError(f"the LoRAs on {w!r} ({[lid for lid, _ in entries]}) cannot be rebuilt by rules: "
                                   f"row slices or different settings without a recorded role", where=where,
                                   fix="adapt the model with rules that give the same LoRAs (role=...), then "
                                       "lora_fx.load_adapter")
        for _, s in entries if by_role else entries[:1]:
            kwargs = {"r": s["r"], "alpha": float(s["alpha"]), "scaling": s.get("scaling") or "standard"}
            if s.get("dropout"):
                kwargs["dropout"] = float(s["dropout"])
            if by_role:
                kwargs["role"] = s["role"]
            # glob= matches the whole name (no dotted-suffix matching as name= does), so "layers.0.q.weight" cannot
            # also select "encoder.layers.0.q.weight".
            rules.append(Rule(glob=globlib.escape(w), **kwargs))
    return rules


def adapt_from_adapter(model: nn.Module, directory: str | os.PathLike, *, example_inputs: tuple | None = None,
                       example_kwargs: dict | None = None, frontend: str | None = None, strict: bool = True,
                       quantized_base: bool = True, **trace_options: Any):
    """Adapt `model` exactly as the saved adapter says (the same weights, r, alpha, scaling, dropout) and load it.

    frontend=None uses the front end the adapter was saved from; modules the adapter trains in full are trained in
    full here too, with the saved weights. An adapter trained against a quantized base (lora_fx.quantize_base)
    records it: with quantized_base=True (the default) the same weights of `model` are quantized the same way, as
    quantize_base does (NF4 replaces them in `model` itself), so the adapted model computes what was trained and
    fold(base="auto") takes the fold recorded at training; quantized_base=False loads the LoRA onto the plain base
    (fold then adds it to W0 as it is). Returns the adapted model (lora_fx.adapt's kind)."""
    from lora_fx.api import adapt_model

    config, tensors = read_adapter(directory)
    tensors, full = _split_full(tensors)
    weights = config["weights"]
    saved = config.get("frontend") or "auto"
    adapt = lambda front: adapt_model(  # noqa: E731
        model, rules_for_weights(weights, str(directory)), example_inputs=example_inputs,
        example_kwargs=example_kwargs, frontend=front, fit_rank=False, modules_to_save=modules_in_full(full),
        **trace_options)
    with unchanged_on_error(model):  # a refused adapter leaves the model as it was (requires_grad, modes)
        try:
            try:
                adapted = adapt(frontend or saved)
            except TraceError:  # the saved front end cannot trace this model (another model, another torch):
                if frontend is not None or saved == "auto":  # "auto" picks one, and a model that is not the
                    raise  # adapter's gets "does not fit" below rather than a tracing error
                adapted = adapt("auto")
        except RuleError as e:  # e.g. no site for any saved weight, or r larger than this model's widths
            raise AdapterFileError(f"the adapter does not fit this {type(model).__name__}: {e.what}",
                                   where=f"{directory}" + (f" ({e.where})" if e.where else ""),
                                   fix="use the model (same architecture and widths) the adapter was trained on") from e
        gm, container, _ = adapter_container(adapted)
        found = {lora_id(lora) for lora in container.values()}
        not_found = [w for w in weights if w not in found]
        if strict and not_found:
            raise AdapterFileError(f"the model has no linear-like site (or role slice) for these adapter weights: "
                                   f"{not_found}",
                                   where=str(directory),
                                   fix="use the model the adapter was trained on, or strict=False to skip them")
        check_and_copy(gm, container, tensors, source=str(directory), strict=strict, settings=weights, full=full)
        record = config.get("quantized_base")
        if quantized_base and record:
            _rebuild_quantized_base(adapted, record, directory)
        elif record and record.get("lora_init") == "loftq":
            warnings.warn(f"lora_fx: the adapter at {directory} started at the quantization error of a "
                          f"{record['kind']} base (lora_init='loftq'): on the plain base it adds that error again, so "
                          f"this model and its fold are further from the trained one than the plain base is; "
                          f"adapt_from_adapter(..., quantized_base=True) rebuilds the base it was trained against",
                          UserWarning, stacklevel=2)
        return adapted


def _rebuild_quantized_base(adapted: nn.Module, record: dict, directory: Any) -> None:
    """Quantize `adapted`'s base as the adapter file records it was trained against."""
    try:
        quantize.reproduce(adapted, record)
    except LoraFxError as e:
        where = f"{directory}" + (f" ({e.where})" if e.where else "")
        fix = (f"{e.fix}; or " if e.fix else "") + "adapt_from_adapter(..., quantized_base=False) to load the LoRA " \
                                                    "onto the plain base"
        raise AdapterFileError(f"the adapter was trained against a {record['kind']} base, which cannot be made "
                               f"here: {e.what}", where=where, fix=fix) from e
