"""The adapted model: the user's own model with LoRA inside, whatever they call it with.

`lora_fx.adapt(model)` returns an instance of a class made from the user's class, `type(name, (AdaptedMixin, cls))`:
a shallow copy of the model (its own attribute and module dicts, the same child modules and weights) plus the LoRA
ModuleDicts. So everything of the original is there by inheritance: `isinstance(adapted, type(model))`, `config`,
`generate`, `device`, `get_input_embeddings`, `state_dict` names (the model's, plus `lora_fx.<key>.lora_A/B`).

The graph is lora_fx's mechanism, not the user's burden (torch.compile's OptimizedModule is the model studied):

  * forward binds the call to the original forward's signature and looks its key up (lora_fx.passes.capture:
    per argument a tensor's rank, dtype and device, a constant's value, a KV cache's layout; the train/eval mode).
    A call seen before runs its captured graph; a new one is captured through the same passes (trace, match,
    inject), every graph calling the same LoRA modules. A graph whose torch.export guard fails (a size it was
    specialized to) is captured again. Captures are bounded (CALLS_PER_KEY, CALLS_IN_ALL), counted, and logged
    on the "lora_fx.capture" logger; `lora_fx.capture_info(adapted)` reports them.
  * calls a graph cannot take (an argument no graph can hold, e.g. a StaticCache) run the original forward with
    each LoRA added by a forward hook on the module that owns its weight (module sites only; others are an error).
  * .to()/.cuda()/.half()/.bfloat16() drop the graphs when a tensor's device or dtype changed (torch.export bakes
    them in): the next call captures again on the new device and dtype.
  * train()/eval() switch the model's own dropout (the children are shared, as with PEFT, but for the adapted
    model's own clones of modules owning an adapted weight: lora_fx.fold takes the adapted model's modes);
    BatchNorm statistics stay frozen (the base is frozen): norms run in eval mode inside every call.
  * gradient_checkpointing_enable() (what transformers' Trainer calls) runs every graph through
    lora_fx.checkpoint_layers; save_pretrained writes the adapter (lora_fx.save_adapter): after lora_fx.fold the
    model is the user's class again, and its save_pretrained writes the merged weights.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from lora_fx import submodule_calls
from lora_fx.errors import InputError, LoraFxError
from lora_fx.passes.capture import CallSpec, bind, call_key
from lora_fx.passes.infra import frozen_norms, shallow_clone
from lora_fx.state import STATE_KEY, LoraState, is_container

CALLS = "_lora_fx_calls"  # the instance-dict key of the adapted model's captured graphs
CALLS_PER_KEY = 8  # graphs kept for one key (a guard failed: torch.dynamo's recompile_limit)
CALLS_IN_ALL = 64  # graphs kept in all (least recently used dropped first)
log = logging.getLogger("lora_fx.capture")


@dataclass
class Entry:
    """One captured call: the graph, how calls of its key become its inputs (None: symbolic-trace graphs take the
    call as it is), and its layer views (lora_fx.split_layers) as they are wanted."""

    graph: fx.GraphModule
    spec: CallSpec | None
    training: bool = False  # the mode it was captured in (dropout is traced live in train mode)
    arguments: dict | None = None  # the call it was captured from, to capture it again in the other mode
    views: dict = field(default_factory=dict)  # (checkpoint every, layer list) -> the graph's layer view

    def __call__(self, calls: "Calls", arguments: dict[str, Any]) -> Any:
        return self.run(arguments, calls.checkpoint_every)

    def run(self, arguments: dict[str, Any], every: int = 0, layers: str | None = None,
            split: bool = False) -> Any:
        """The call on this graph; through its layer view when checkpointing (`every` > 0) or `split`."""
        runner = self.layer_view(every, layers) if every or split else self.graph
        if self.spec is None:
            return runner(**arguments)
        return self.spec.rebuild_output(runner(*self.spec.leaves(arguments)), arguments)

    def layer_view(self, every: int, layers: str | None = None) -> nn.Module:
        """lora_fx.passes.split_layers of this graph (every `every`-th layer checkpointed), made once."""
        view = self.views.get((every, layers))
        if view is None:
            from lora_fx.passes.split_layers import split_layers
            view = self.views[every, layers] = split_layers(self.graph, every, layers).graph_module
        return view


@dataclass
class Calls:
    """The adapted model's captured graphs, by call key, and what happened to them."""

    signature: inspect.Signature
    frontend: str
    trace_options: dict
    causal_attention: bool
    graphs: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    captures: int = 0
    recaptures: list[str] = field(default_factory=list)
    evictions: int = 0
    fallbacks: int = 0
    checkpoint_every: int = 0
    base_changes: int = 0  # times the base under the graphs changed (quantize_base): older layer views are stale
    names: frozenset = frozenset()
    warned: bool = False

    def __post_init__(self) -> None:
        self.names = frozenset(self.signature.parameters)
        self._bind = self.signature.bind  # the Signature is made once: making it per call costs ~0.3 ms

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if not args and all(k in self.names for k in kwargs):  # the common keyword-only call: no binding
            return dict(kwargs)
        try:
            return bind(self.signature, args, kwargs)
        except TypeError as err:
            raise TypeError(f"{err} (the adapted model takes the arguments of the original forward: "
                            f"{list(self.signature.parameters)})") from None

    def _slot(self, key: tuple) -> tuple:
        """A symbolic trace serves every call in its train/eval mode (key[0]); a torch.export graph one key."""
        return ("fx", key[0]) if self.frontend == "fx" else key

    def entries(self, key: tuple) -> list[Entry]:
        found = self.graphs.get(self._slot(key), [])
        if found:
            self.graphs.move_to_end(self._slot(key))
        return found

    def add(self, key: tuple, entry: Entry) -> None:
        entries = self.graphs.setdefault(self._slot(key), [])
        entries.insert(0, entry)
        del entries[CALLS_PER_KEY:]
        while sum(len(v) for v in self.graphs.values()) > CALLS_IN_ALL:
            self.graphs.popitem(last=False)
            self.evictions += 1
            if not self.warned:
                self.warned = True
                log.warning("lora_fx: more than %d captured graphs; the least recently used are dropped (calls with "
                            "ever new argument kinds are captured again each time)", CALLS_IN_ALL)

    def clear(self, keep_symbolic: bool = True) -> None:
        """Drop the graphs that bake devices and dtypes in (torch.export's); symbolic traces hold none."""
        if not (keep_symbolic and self.frontend == "fx"):
            self.graphs.clear()

    def latest(self, training: bool | None = None) -> Entry | None:
        """The most recently used graph (captured in `training` mode, if given)."""
        for entries in reversed(self.graphs.values()):
            for entry in entries:
                if training is None or entry.training == training:
                    return entry
        return None


class AdaptedMixin:
    """What the generated class puts before the user's class (see the module docstring)."""

    def _lora_fx_forward(self, *args: Any, **kwargs: Any) -> Any:
        calls: Calls = self.__dict__[CALLS]
        arguments = calls.bind(args, kwargs)
        key = call_key(arguments, self.training)
        with frozen_norms(self):
            if key is None:
                return eager_with_hooks(self, arguments)
            for entry in calls.entries(key):
                try:
                    return entry(calls, arguments)
                except AssertionError as err:  # torch.export's guard, raised before any op ran
                    if not str(err).startswith("Guard failed"):
                        raise
                    calls.recaptures.append(str(err).splitlines()[0][:200])
                    log.info("lora_fx: recapturing %s: %s", type(self).__name__, calls.recaptures[-1])
            from lora_fx.api import capture_call  # the pipeline lives with the rest of adapt

            entry = capture_call(self, arguments)
            calls.add(key, entry)
            return entry(calls, arguments)

    # ---------------------------------------------------------------------------------------- device and dtype
    def _apply(self, fn, recurse: bool = True):
        tensors = lambda: [(t.data_ptr(), t.dtype, t.device) for t in (*self.parameters(), *self.buffers())]
        before = tensors()
        out = super()._apply(fn, recurse)
        if tensors() != before:  # Trainer's model.to(the same device) keeps the graphs
            self.__dict__[CALLS].clear()
        return out

    # ---------------------------------------------------------------------------------------- transformers
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **_: Any) -> None:
        """What transformers' Trainer(gradient_checkpointing=True) calls: every graph runs as
        lora_fx.checkpoint_layers(graph) (each layer keeps only its inputs). The model's own flags stay as they are
        (its checkpointing would be traced through and save nothing)."""
        self.__dict__[CALLS].checkpoint_every = 1

    def gradient_checkpointing_disable(self) -> None:
        self.__dict__[CALLS].checkpoint_every = 0

    activation_checkpointing_enable = gradient_checkpointing_enable
    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.__dict__[CALLS].checkpoint_every)

    def enable_input_require_grads(self) -> None:
        """Nothing to do: checkpointing here is non-reentrant, so inputs need no requires_grad hook."""

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """nn.Module.load_state_dict, refusing before anything is copied a state dict whose NF4 weights
        (quantize_base(..., "nf4")) would land on weights of this model that are not NF4 (torchao then fails
        midway on each of them)."""
        from lora_fx.nf4 import is_nf4

        names = [k for k, v in state_dict.items() if is_nf4(v)]
        params = dict(self.named_parameters())
        plain = [k for k in names if k in params and not is_nf4(params[k])]
        if plain:
            raise InputError(f"the state dict holds NF4 weights (a model after quantize_base(..., 'nf4')) for "
                             f"{plain[:3]}{' ...' if len(plain) > 3 else ''}, which are not NF4 in this model",
                             where=type(self).__name__,
                             fix="lora_fx.quantize_base(this model, 'nf4') first, or move the adapter with "
                                 "lora_fx.save_adapter / lora_fx.adapt_from_adapter (it rebuilds the NF4 base)")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                *args: Any, **kwargs: Any) -> Any:
        """A resize to the size the table has passes through (tokenizer scripts call it unconditionally); another
        size is refused before anything changes: it would replace the embedding and output modules under graphs
        and LoRA shapes made for the old vocabulary, and fold would give back the old head."""
        current = self.get_input_embeddings().weight.shape[0]
        want = current if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of:
            want = -(-want // pad_to_multiple_of) * pad_to_multiple_of
        if want != current:
            raise InputError(f"resize_token_embeddings({want}) after lora_fx.adapt: the adapted model's graphs and "
                             f"LoRA shapes were made for {current} tokens", where=type(self).__name__,
                             fix=f"resize the original model first, then adapt it: model.resize_token_embeddings("
                                 f"{want}); lora_fx.adapt(model, ..., modules_to_save=[<the embedding>, <the output "
                                 f"head>]) trains the new rows")
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, *args, **kwargs)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """Write the adapter (LoRA weights, modules trained in full, settings; lora_fx.load_adapter reads it) into
        the folder beside what it holds, and the trainable state that transformers' Trainer resumes from
        (lora_fx.adapter_file.save_pretrained_files). The merged model (lora_fx.fold) is the user's class, whose
        save_pretrained writes full weights."""
        from lora_fx.adapter_file import save_pretrained_files

        return save_pretrained_files(self, save_directory)

    def __reduce_ex__(self, protocol: int):
        state = dict(self.__dict__)
        calls = state[CALLS]
        state[CALLS] = Calls(calls.signature, calls.frontend, calls.trace_options, calls.causal_attention,
                             checkpoint_every=calls.checkpoint_every)  # graphs are captured again
        return _rebuild, (self.__dict__["_lora_fx_class"], state)


def _rebuild(cls: type, state: dict) -> nn.Module:
    new = object.__new__(adapted_class(cls))
    new.__dict__.update(state)
    return new


_CLASSES: dict[type, type] = {}


def adapted_class(cls: type) -> type:
    """The class of adapted `cls` models, made once per class. Its name is the user's class's name (transformers
    writes it into config.architectures on save); its forward shows the original signature (transformers' Trainer
    keeps only the dataset columns the forward names)."""
    if cls not in _CLASSES:
        @functools.wraps(cls.forward)
        def forward(self, *args, **kwargs):
            return AdaptedMixin._lora_fx_forward(self, *args, **kwargs)

        _CLASSES[cls] = type(cls.__name__, (AdaptedMixin, cls), {
            "forward": forward, "__module__": __name__, "__qualname__": f"Adapted[{cls.__qualname__}]"})
    return _CLASSES[cls]


def is_adapted(module: Any) -> bool:
    return isinstance(module, AdaptedMixin)


def shallow_copy(model: nn.Module, cls: type | None = None) -> nn.Module:
    """`model` as an instance of `cls` (default: its own class) over the same child modules and tensors, without
    lora_fx's own records."""
    new = shallow_clone(model, cls)
    for attr in (STATE_KEY, CALLS, "_lora_fx_class", "_lora_fx_model"):
        new.__dict__.pop(attr, None)
    return new


def new_adapted(model: nn.Module, calls: Calls) -> nn.Module:
    """The adapted model object (no LoRA yet): a shallow copy of `model` in the generated class."""
    cls = type(model)
    adapted = shallow_copy(model, adapted_class(cls))
    adapted.__dict__["_lora_fx_class"] = cls
    adapted.__dict__["_lora_fx_model"] = model
    adapted.__dict__[CALLS] = calls
    return adapted


def core(adapted: nn.Module) -> nn.Module:
    """What graphs are traced from: the adapted model as an instance of the user's class (its own forward), over the
    same modules minus the LoRA containers."""
    plain = shallow_copy(adapted, adapted.__dict__.get("_lora_fx_class", type(adapted)))
    for name in [n for n in plain._modules if is_container(n)]:
        del plain._modules[name]
    return submodule_calls.unhooked(plain, adapted)  # graphs add each LoRA themselves


def user_model(adapted: nn.Module) -> nn.Module:
    """The model the user gave to adapt."""
    return adapted.__dict__["_lora_fx_model"]


def capture_info(adapted: nn.Module) -> dict[str, Any]:
    """How many graphs the adapted model holds and captured, the recaptures (guard failures, with their guard),
    evictions and eager fallbacks: the counters torch._dynamo keeps for recompiles."""
    from lora_fx.state import unwrap

    calls: Calls = unwrap(adapted).__dict__[CALLS]
    return {"graphs": sum(len(v) for v in calls.graphs.values()), "captures": calls.captures,
            "recaptures": list(calls.recaptures), "evictions": calls.evictions, "fallbacks": calls.fallbacks,
            "frontend": calls.frontend, "checkpointing": bool(calls.checkpoint_every)}


def eager_with_hooks(adapted: nn.Module, arguments: dict[str, Any]) -> Any:
    """Run the original forward eagerly, for calls no graph can take: each enabled LoRA is added by the forward
    hook lora_fx.submodule_calls put on the module owning its weight (nn.Linear, GPT-2's Conv1D, nn.Conv*d,
    nn.Embedding). A LoRA on a bare parameter used by F.linear/matmul cannot be hooked: LoraFxError."""
    calls: Calls = adapted.__dict__[CALLS]
    state: LoraState = adapted.__dict__[STATE_KEY]
    unhookable = [lora.weight_name for container in state.containers(adapted).values() for lora in container.values()
                  if not submodule_calls.hookable(lora)]
    if unhookable:
        raise LoraFxError(
            f"this call has an argument no graph can hold ({_uncapturable(arguments)}), and the LoRA on "
            f"{unhookable[:5]} is on a bare parameter, which only a graph can apply", where=type(adapted).__name__,
            fix="call the model with tensors, plain constants and transformers' DynamicCache (e.g. generate with "
                "the default cache, not cache_implementation='static')")
    calls.fallbacks += 1
    return adapted.__dict__["_lora_fx_class"].forward(adapted, **arguments)  # the hooks of submodule_calls


def _uncapturable(arguments: dict[str, Any]) -> str:
    from lora_fx.passes.capture import leaf_key

    return ", ".join(f"{name}: {type(value).__name__}" for name, value in arguments.items()
                     if leaf_key(value) is None) or "?"


def exportable(entry: Entry, adapted: nn.Module, arguments: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """(a module computing this captured call, the keyword inputs to export it with) for torch.onnx.export of an
    unmerged model. A GraphModule is exported as itself, so the exporter keeps each node's module path (fold_onnx
    names and keeps branches by it): a symbolic trace takes the call as it is; a torch.export graph of tensors and
    constants gets the call's tensor arguments, by name, and returns the model's output structure. Other calls
    (a KV cache) go through `graph_call`."""
    import copy

    import torch.utils._pytree as pytree
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    from lora_fx.passes.infra import clone_graph_module

    spec = entry.spec
    if spec is None:
        return entry.graph, arguments
    slots = spec.output[1] if spec.output else [("cache", 0)]
    if any(k[0] not in ("tensor", "constant") for k in spec.kinds.values()) or any(k != "tensor" for k, _ in slots):
        return graph_call(entry, adapted), arguments
    names = [n for n in spec.names if spec.kinds[n][0] == "tensor"]
    graph = copy.deepcopy(entry.graph.graph)
    in_spec = pytree.tree_structure((tuple(range(len(names))), {}))
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, spec.output[0]))
    return clone_graph_module(entry.graph, graph=graph), {n: arguments[n] for n in names}


def graph_call(entry: Entry, adapted: nn.Module) -> nn.Module:
    """A module computing one captured call with the original forward's signature and parameter names (for
    torch.onnx.export of an unmerged model: its inputs are named as the base model's): binds the call, feeds the
    graph its leaves, rebuilds the output."""
    original = adapted.__dict__["_lora_fx_class"].forward
    signature = adapted.__dict__[CALLS].signature

    graph = entry.graph
    run = type(graph).forward  # the graph's generated code, run on this module (it holds the graph's dicts, so a
                               # copy of it, e.g. export_onnx's cast copy, runs on its own tensors)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if entry.spec is None:
            return run(self, *args, **kwargs)
        arguments = bind(signature, args, kwargs)
        return entry.spec.rebuild_output(run(self, *entry.spec.leaves(arguments)), arguments)

    module = type("GraphCall", (nn.Module,), {"forward": forward})()
    for attr in ("_parameters", "_buffers", "_modules"):  # the graph's tensors under the model's own names
        module.__dict__[attr] = graph.__dict__[attr]
    for attr in ("_in_spec", "_out_spec"):  # read by the code of a graph whose inputs are a pytree (torch.export's)
        if attr in graph.__dict__:
            module.__dict__[attr] = graph.__dict__[attr]
    module.training = graph.training
    return module


def require_inputs(what: str) -> InputError:
    return InputError(f"{what} needs a captured graph, and this adapted model has none yet", where="adapted",
                      fix="pass example inputs (the call to capture), or call the model once first")
