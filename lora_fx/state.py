"""LoRA state: one home for what adapt records, and one way to find it.

An adapted model (lora_fx.adapted) keeps its `LoraState` in its instance dict under STATE_KEY; every graph it
captures keeps a `LoraState` in `gm.meta["lora_fx"]` that shares the model's adapters, rules, merged and untied
records (the same dict/list/set objects) and adds its own traced graph, sites and decisions, so the graph passes
(fold's node-for-node check, split_layers, export) read one type whatever they are given.

The LoRA branch modules live in ModuleDicts named by `container_name(adapter)`: `lora_fx` for the default adapter,
`lora_fx_<name>` for others, children of the adapted model and of every graph it captured (the same objects).

`adapted_state(x)` is the one accessor: it unwraps DistributedDataParallel, torch.compile and layer views and raises
NotAdaptedError for anything lora_fx did not adapt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lora_fx.errors import NotAdaptedError

STATE_KEY = "_lora_fx"  # the adapted model's instance-dict key (not an attribute users or state_dict see)
CONTAINER = "lora_fx"  # the ModuleDict of the default adapter's LoRA modules
DEFAULT = "default"  # the adapter adapt creates; others live in ModuleDicts named lora_fx_<name>
BRANCH, ADD = "branch", "add"  # node.meta["lora_fx"] tags of the nodes inject adds and fold removes


def container_name(adapter: str) -> str:
    return CONTAINER if adapter == DEFAULT else f"{CONTAINER}_{adapter}"


def is_container(name: str) -> bool:
    return name == CONTAINER or name.startswith(CONTAINER + "_")


@dataclass
class LoraState:
    """What adapt decided and did; shared by the adapted model and each graph it captured (see the module doc)."""

    frontend: str  # "fx" (symbolic tracing) or "export" (torch.export): how graphs are captured
    original_graph: list  # graph_signature of the traced graph before injection (per graph)
    sites: list  # every candidate Site of that graph
    decisions: list  # the rules' Decisions for those sites
    adapters: dict[str, dict[str, str]] = field(default_factory=dict)  # adapter name -> {LoRA key: weight name}
    untied: set[str] = field(default_factory=set)  # tied weights the user chose to untie at fold
    merged: list[str] = field(default_factory=list)  # adapters merged in place by merge_adapter, in order
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # exact W0 kept by merge_adapter
    rules: dict[str, Any] = field(default_factory=dict)  # adapter name -> the rules it was given (None: every site)
    defaults: dict[str, Any] = field(default_factory=dict)  # adapter name -> its LoraSettings defaults
    modules_to_save: tuple[str, ...] = ()  # modules trained in full beside the LoRA (their own copies)
    quantized: dict[str, Any] = field(default_factory=dict)  # weight name -> QuantizedWeight (lora_fx.quantize)
    fold_choice: str | None = None  # the fold base compare_folds measured closer (fold(base="auto") takes it)

    def containers(self, owner: nn.Module) -> dict[str, nn.ModuleDict]:
        """{adapter name: its ModuleDict of LoRA branch modules} in the order the adapters were added."""
        return {name: getattr(owner, container_name(name)) for name in self.adapters}

    def for_graph(self, original_graph: list, sites: list, decisions: list) -> "LoraState":
        """The state of one captured graph: its own traced graph, sites and decisions, the model's records."""
        return LoraState(self.frontend, original_graph, sites, decisions, self.adapters, self.untied, self.merged,
                         self.originals, self.rules, self.defaults, self.modules_to_save, self.quantized)


def unwrap(module: Any) -> Any:
    """The adapted model inside DistributedDataParallel / torch.compile wrappers or a layer view
    (lora_fx.split_layers / checkpoint_layers), or `module` itself."""
    from lora_fx.passes.split_layers import LayerView

    for _ in range(8):
        inner = getattr(module, "_orig_mod", None) if isinstance(module, nn.Module) else None  # torch.compile
        if isinstance(module, LayerView):
            inner = module.adapted
        if inner is None and type(module).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner
    return module


def find_state(module: Any) -> LoraState | None:
    """The LoraState of an adapted model or of a graph it captured (no unwrapping), or None."""
    state = getattr(module, "__dict__", {}).get(STATE_KEY)
    if isinstance(state, LoraState):
        return state
    meta = getattr(module, "meta", None) if isinstance(module, fx.GraphModule) else None
    state = meta.get("lora_fx") if isinstance(meta, dict) else None
    return state if isinstance(state, LoraState) else None


def adapted_state(obj: Any, *, what: str = "use") -> tuple[nn.Module, LoraState]:
    """(the adapted model or captured graph, its LoraState); NotAdaptedError for anything else.

    `what` completes the message: "cannot <what> this Linear: it was not adapted by lora_fx"."""
    module = unwrap(obj)
    if not isinstance(module, nn.Module):
        raise NotAdaptedError(f"expected a module returned by lora_fx.adapt, got {type(obj).__name__}",
                              where="adapted", fix="call lora_fx.adapt(model, ...) first and pass its result")
    state = find_state(module)
    if state is None:
        raise NotAdaptedError(
            f"cannot {what} this {type(module).__name__}: it was not adapted by lora_fx (it has no LoRA modules)",
            where=type(module).__name__,
            fix="pass the model lora_fx.adapt returned, or use lora_fx.adapt_from_adapter(model, directory, "
                "example_inputs=...) to adapt a plain model with a saved adapter's own settings")
    return module, state


def adapter_container(obj: Any, adapter: str = DEFAULT, *, what: str = "use") -> tuple[nn.Module, nn.ModuleDict,
                                                                                          LoraState]:
    """(owner, the ModuleDict of `adapter`, state); NotAdaptedError when there is no such adapter."""
    owner, state = adapted_state(obj, what=what)
    container = getattr(owner, container_name(adapter), None)
    if adapter not in state.adapters or not isinstance(container, nn.ModuleDict):
        names = sorted(state.adapters)
        raise NotAdaptedError(f"this {type(owner).__name__} has no adapter named {adapter!r}",
                              where=type(owner).__name__, fix=f"use one of {names}")
    return owner, container, state
