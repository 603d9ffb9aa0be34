"""LoRA on direct calls of the adapted model's submodules, as PEFT users get it.

Clients call parts of a model, not only the model: TRL's SFTTrainer runs `model.base_model(...)` and the LM head on
its own, pipelines call `get_decoder()`, users call `adapted.model.layers[3]` while debugging. Those calls never reach
lora_fx's graphs, so without this the LoRA would be silently missing from them.

So the adapted model's tree holds, at every module that owns an adapted weight (an nn.Linear, GPT-2's Conv1D, a
convolution, an embedding), its own clone of that module (the same parameter and buffer dicts, so the same tensors,
device moves and FSDP shards) with a forward hook adding that weight's enabled LoRA branches. The graphs are traced
from a tree with hook-free clones at those places (`unhooked`), so they add each branch once, in the graph. A module
whose adapted weight only a graph can reach (a bare parameter used by F.linear / matmul, a slice of a packed weight,
an expert weight) gets a pre-hook that refuses the direct call with a clear error instead of running without LoRA.
The user's model is never touched: every clone lives in the adapted model's own tree.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lora_fx.errors import LoraFxError

ORIGINALS = "_lora_fx_unhooked"  # adapted.__dict__ key: {module path: the module before lora_fx hooked it}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_forward_pre_hooks_with_kwargs")


class AddLora:
    """Forward hook: the module's output plus one LoRA branch of its weight (nothing when the branch is disabled)."""

    def __init__(self, lora: nn.Module):
        self.lora = lora

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> Any:
        if not self.lora.enabled:
            return None
        return output + self.lora(inputs[0]).to(output.dtype)  # an embedding's ids carry no dtype to follow


class GraphOnly:
    """Forward pre-hook on a module whose LoRA only the adapted model's graphs can apply (silent while every such
    branch is disabled: then the direct call computes what the model does)."""

    def __init__(self, path: str, loras: list[nn.Module]):
        self.path, self.loras = path, loras
        self.weights = [lora.weight_name for lora in loras]

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        if not any(lora.enabled for lora in self.loras):
            return
        raise LoraFxError(
            f"{self.path or 'this module'} was called on its own, and its LoRA on {self.weights} sits on a bare "
            "parameter (F.linear / matmul on it) or on a slice of a packed weight, which only the adapted model's "
            "own forward (its captured graphs) can apply", where=self.path or type(module).__name__,
            fix="call the adapted model itself; or adapt with rules that choose module sites (nn.Linear and the like), "
                "whose LoRA also applies when their module is called directly")


def hookable(lora: nn.Module) -> bool:
    """Whether a forward hook on the module owning the branch's weight adds it exactly: the module calls its own
    `weight` whole (not a bare parameter of a larger module, not a slice of a packed weight, not the root's)."""
    owner_path, _, leaf = lora.weight_name.rpartition(".")
    return bool(owner_path) and leaf == "weight" and lora.output_rows is None


def _clone(module: nn.Module, hooks_of: nn.Module) -> nn.Module:
    """`module` over the same parameter and buffer dicts, with its own child dict and the hooks of `hooks_of`."""
    clone = object.__new__(type(module))
    clone.__dict__ = dict(module.__dict__)
    clone.__dict__["_modules"] = dict(module.__dict__["_modules"])
    for attr in _HOOKS:
        if attr in hooks_of.__dict__:
            clone.__dict__[attr] = type(hooks_of.__dict__[attr])(hooks_of.__dict__[attr])
    return clone


def _walk(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the parent of the module at `path`, its name there)."""
    *above, name = path.split(".")
    for part in above:
        root = root._modules[part]
    return root, name


def _owned(adapted: nn.Module, path: str) -> nn.Module:
    """The module at `path` in the adapted model's own tree: every module on the way is replaced by a clone unless
    it is one already (the module it replaced is kept in ORIGINALS)."""
    originals: dict[str, nn.Module] = adapted.__dict__.setdefault(ORIGINALS, {})
    parts = path.split(".")
    for depth in range(1, len(parts) + 1):
        here = ".".join(parts[:depth])
        if here not in originals:
            parent, name = _walk(adapted, here)
            originals[here] = child = parent._modules[name]
            parent._modules[name] = _clone(child, hooks_of=child)
    return adapted.get_submodule(path)


def attach(adapted: nn.Module, container: nn.ModuleDict) -> None:
    """Hook every LoRA branch of `container` onto the module owning its weight, in the adapted model's tree."""
    refused: dict[str, list[nn.Module]] = {}
    for lora in container.values():
        owner_path = lora.weight_name.rpartition(".")[0]
        if hookable(lora):
            _owned(adapted, owner_path).register_forward_hook(AddLora(lora))
        elif owner_path:
            refused.setdefault(owner_path, []).append(lora)
    for path, loras in refused.items():
        _owned(adapted, path).register_forward_pre_hook(GraphOnly(path, loras))


def unhooked(plain: nn.Module, adapted: nn.Module) -> nn.Module:
    """`plain` (a shallow copy of the adapted model) with a hook-free clone at every place the adapted model hooked,
    for graphs to be traced from: each clone carries the adapted module's state (train/eval flag, children) and the
    hooks of the module it replaced, and shares its parameter and buffer dicts, so graphs read the same weights (and
    FSDP2 shards reach the adapted model)."""
    originals: dict[str, nn.Module] = adapted.__dict__.get(ORIGINALS, {})
    for path in sorted(originals, key=lambda p: p.count(".")):  # parents first: children go into fresh clones
        parent, name = _walk(plain, path)
        parent._modules[name] = _clone(parent._modules[name], hooks_of=originals[path])
    return plain
