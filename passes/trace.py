"""Trace pass: turn a model into a torch.fx GraphModule.

Two front ends, both giving a GraphModule whose parameters are the model's own tensors (no copies):
  * "fx": torch.fx symbolic tracing. Keeps nn.Linear calls as `call_module` nodes; cannot follow Python control
    flow on tensors, and fails on every transformers-5 model (their forwards take **kwargs).
  * "export": torch.export (non-strict) in eval mode. Works on transformers models; gives aten-level nodes
    (`aten.linear`, `aten.addmm`). The model's own dropout is baked in as in eval mode.
"auto" tries symbolic tracing first and takes torch.export when that fails or hides linear layers inside leaf
modules (nn.MultiheadAttention, nn.TransformerEncoderLayer...).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import fx, nn

from lora_fx.errors import InputError, TraceError
from lora_fx.passes.capture import CallSpec, bind, capture_export
from lora_fx.passes.infra import PassResult

FRONTENDS = ("auto", "fx", "export")


@dataclass
class TraceResult(PassResult):
    frontend: str = "fx"
    spec: CallSpec | None = None  # torch.export graphs take a call's leaves (passes/capture.py); fx ones the call


# ---------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside the block; every submodule's own training flag restored afterwards.

    Sets the flags directly rather than calling .eval(): torch.export's unlifted modules refuse .eval()."""
    flags = {m: m.training for m in model.modules()}
    for m in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def leaves(value: Any) -> list[Any]:
    """The leaves of a model's inputs or outputs in the exporter's order: tuples and lists in order, dicts and HF
    ModelOutputs by insertion order (a ModelOutput's unset fields are absent). The one flattener of lora_fx."""
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple") and callable(value.to_tuple):
        value = value.to_tuple()
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in leaves(item)]
    return [value]


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a model's output in a fixed order (tuples, lists, dicts, HF ModelOutput)."""
    return [leaf for leaf in leaves(out) if isinstance(leaf, torch.Tensor)]


def run_model(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Run the user's model once on the example inputs; a failure is the user's inputs not fitting the model."""
    try:
        with torch.no_grad(), eval_mode(model):
            return model(*args, **kwargs)
    except Exception as e:  # the model's own error, whatever its type
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        raise InputError(
            f"the example inputs do not fit the model: {type(e).__name__}: {e}",
            where=f"{type(model).__name__}.forward with args {shapes} and kwargs {sorted(kwargs)}",
            fix="pass example_inputs (a tuple) and example_kwargs (a dict) that model(*example_inputs, "
            "**example_kwargs) accepts",
        ) from e


class _Tracer(fx.Tracer):
    """Symbolic tracer whose leaves the user can change: keep some modules closed, open others."""

    def __init__(self, leaf_modules: Iterable = (), open_modules: Iterable = ()):
        super().__init__()
        self.leaf_modules, self.open_modules = list(leaf_modules), list(open_modules)

    @staticmethod
    def _selected(module: nn.Module, name: str, selectors: list) -> bool:
        return any((isinstance(s, str) and s in (name, type(module).__name__))
                   or (isinstance(s, type) and isinstance(module, s)) for s in selectors)

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if self._selected(m, qualified_name, self.leaf_modules):
            return True
        if self._selected(m, qualified_name, self.open_modules):
            return False
        return super().is_leaf_module(m, qualified_name)


def hidden_linear_modules(gm: fx.GraphModule, kept_closed: Iterable = ()) -> list[str]:
    """Leaf modules in a symbolic-trace graph that hold linear weights the match pass cannot see. Modules the
    user kept closed on purpose (leaf_modules=) do not count: they are not hidden, they are excluded."""
    hidden, kept_closed = [], list(kept_closed)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear) or _Tracer._selected(module, node.target, kept_closed):
            continue
        if isinstance(module, nn.MultiheadAttention) or any(isinstance(m, nn.Linear) for m in module.modules()):
            hidden.append(node.target)
    return hidden


def _outputs_match(a: Any, b: Any) -> bool:
    fa, fb = flatten_outputs(a), flatten_outputs(b)
    return len(fa) == len(fb) and all(
        x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
        for x, y in zip(fa, fb))


# ---------------------------------------------------------------------------------------------------- front ends
def trace_fx(model: nn.Module, *, leaf_modules=(), open_modules=(), concrete_args=None) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules, open_modules)
    graph = tracer.trace(model, concrete_args=concrete_args)
    # the graph calls the model's own module objects: an adapted model's graphs follow its train()/eval() and
    # .to() as the model would
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


def _auto_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Every dim of every tensor input as Dim.AUTO: dynamic where the model allows it, static otherwise."""
    auto = lambda t: {i: torch.export.Dim.AUTO for i in range(t.dim())} if isinstance(t, torch.Tensor) else None
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    spec = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(auto(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: auto(v) for k, v in value.items()}
        else:
            spec[name] = torch.utils._pytree.tree_map(auto, value)
    return spec


def _has_size_one(args: tuple, kwargs: dict) -> bool:
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return any(isinstance(t, torch.Tensor) and 1 in t.shape for t in leaves)


def _export_program(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """torch.export with every dim Dim.AUTO. An example of batch 1 (one tokenized sentence) would pin that dim to
    1 (torch.export specializes sizes 0 and 1), so such examples are traced size-oblivious first: a size-1 dim then
    stays as dynamic as any other. Models that refuse that (transformers' sdpa attention takes is_causal from
    query length > 1) are traced as usual; models that refuse symbolic sizes at all, static."""
    dynamic = _auto_dynamic_shapes(model, args, kwargs)
    if _has_size_one(args, kwargs):
        from torch.fx.experimental import _config as shape_config
        try:
            with shape_config.patch(backed_size_oblivious=True):
                return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
        except Exception:
            pass
    try:
        return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
    except Exception:  # some models refuse symbolic sizes; a static graph still serves
        return torch.export.export(model, args, kwargs, strict=False)


def trace_export(model: nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, CallSpec]:
    """One call of `model` through torch.export, as a graph over the call's leaves (passes/capture.py), in the
    model's current train/eval mode (dropout is traced as it runs in that mode)."""
    # ep.module() refuses .train()/.eval(); trace_call gives a plain GraphModule over the same graph and tensors
    return trace_call(model, bind(inspect.signature(model.forward), args, kwargs), "export", {})


def drop_dtype_asserts(gm: fx.GraphModule) -> int:
    """Remove torch.export's `_assert_tensor_metadata` checks: they pin every dtype seen while tracing, so the
    graph would refuse to run under autocast (mixed-precision training). They compute nothing and export to no
    ONNX op."""
    dropped = 0
    for module in gm.modules():  # also the subgraphs of higher-order ops (no_grad / autocast regions)
        if not isinstance(module, fx.GraphModule):
            continue
        asserts = [n for n in module.graph.nodes
                   if n.target is torch.ops.aten._assert_tensor_metadata.default and not n.users]
        for node in asserts:
            module.graph.erase_node(node)
        if asserts:
            module.recompile()
            dropped += len(asserts)
    return dropped


# ---------------------------------------------------------------------------------------------------- the pass
def _hint(fx_error: str | None, export_error: str | None, have_inputs: bool = False) -> str:
    text = f"{fx_error or ''} {export_error or ''}"
    hints = []
    if "co_varnames" in text or "**kwargs" in text:
        hints.append("this forward takes **kwargs (transformers 5 models do): use frontend='export'")
    if "control flow" in text or "cannot be iterated" in text or "'len' is not supported" in text:
        hints.append("symbolic tracing cannot follow Python control flow on tensors: use frontend='export', "
                     "keep the offending module closed with leaf_modules=[...], or fix its arguments with concrete_args")
    if "Cache" in text:
        hints.append("the model returns a KV cache that torch.export rejects: pass use_cache=False "
                     "(in example_kwargs or the model's config)")
    if "data-dependent" in text.lower() or "GuardOnDataDependent" in text:
        hints.append("the model branches on tensor values: make that branch static (config flag) or mark "
                     "the module as a leaf for symbolic tracing")
    if export_error is None and fx_error is not None:
        hints.append("try frontend='export' (or 'auto', which falls back to it)" if have_inputs else
                     "torch.export needs example_inputs: pass them so lora_fx can try it")
    return "; ".join(hints) or ("open or close modules with leaf_modules=/open_modules=, or try the other front "
                                "end with frontend='fx' or 'export'")


def trace(model: nn.Module, example_args: tuple | None = None, example_kwargs: dict | None = None, *,
          frontend: str = "auto", leaf_modules: Iterable = (), open_modules: Iterable = (),
          concrete_args: dict | None = None) -> TraceResult:
    """Trace `model` with the chosen front end; raise one TraceError quoting every front end's failure."""
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}", where="model",
                         fix="pass the model object itself (an nn.Module)")
    if frontend not in FRONTENDS:
        raise InputError(f"unknown frontend {frontend!r}", where="frontend", fix=f"use one of {list(FRONTENDS)}")
    args, kwargs = example_args, dict(example_kwargs or {})
    if args is not None and not isinstance(args, tuple):
        if not isinstance(args, (torch.Tensor, list)):
            raise InputError(f"example_inputs must be a tuple of the forward's positional arguments, got "
                             f"{type(args).__name__}", where="example_inputs",
                             fix="pass example_inputs=(x,) (a tuple, even for one input)")
        args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    have_inputs = args is not None or bool(kwargs)
    args = args or ()
    reference = run_model(model, args, kwargs) if have_inputs else None

    fx_error = export_error = None
    changes: list[str] = []
    if frontend in ("auto", "fx"):
        try:
            options = dict(leaf_modules=leaf_modules, open_modules=open_modules, concrete_args=concrete_args)
            with eval_mode(model):  # checked against the model in eval mode (no random dropout)
                gm = trace_fx(model, **options)
            if reference is not None:
                with torch.no_grad(), eval_mode(model):
                    if not _outputs_match(gm(*args, **kwargs), reference):
                        raise TraceError("the symbolically traced graph computes something else than the model")
            hidden = hidden_linear_modules(gm, kept_closed=leaf_modules)
            if model.training:  # a forward may read self.training (F.dropout(training=...)): trace it as it runs
                gm = trace_fx(model, **options)
            if frontend == "fx" or not hidden or not have_inputs:
                changes.append("traced with torch.fx symbolic tracing")
                if hidden:
                    changes.append(f"leaf modules hide linear layers: {hidden} (open them with open_modules=)")
                return TraceResult(gm, True, changes, frontend="fx")
            changes.append(f"symbolic tracing hides linear layers inside {hidden}; trying torch.export")
        except Exception as e:
            fx_error = f"{type(e).__name__}: {e}"
            if frontend == "fx":
                raise TraceError(f"torch.fx symbolic tracing failed: {fx_error}", where=type(model).__name__,
                                 fix=_hint(fx_error, None, have_inputs)) from e
    if not have_inputs:
        raise TraceError(f"torch.fx symbolic tracing failed: {fx_error}" if fx_error else
                         "torch.export needs example inputs", where=type(model).__name__,
                         fix="pass example_inputs=(...) so lora_fx can trace with torch.export")
    try:
        gm, spec = trace_export(model, args, kwargs)
    except Exception as e:
        export_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        causes = (f"torch.fx symbolic tracing: {fx_error}\n" if fx_error else "") + f"torch.export: {export_error}"
        raise TraceError(f"no front end could trace the model:\n{causes}", where=type(model).__name__,
                         fix=_hint(fx_error, export_error)) from e
    if fx_error:
        changes.append(f"symbolic tracing failed ({fx_error.splitlines()[0][:120]}); traced with torch.export")
    else:
        changes.append("traced with torch.export")
    return TraceResult(gm, True, changes, frontend="export", spec=spec)


def _read_through(gm: fx.GraphModule, model: nn.Module, unlifted: nn.Module) -> None:
    """Let `gm` read the weights through the model's own module objects (so fully_shard of a layer, or .to(), reaches
    what the graph reads), not the containers torch.export's unlifting made. Constants the unlifting put beside a
    module's weights (lifted tensors) move to gm's top level, so the model's modules stay as they were."""
    moved = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." in node.target:
            value = _attribute(unlifted, node.target)
            if _attribute(model, node.target) is not value:
                name = f"_lora_fx_constant_{moved}"
                setattr(gm, name, value)
                node.target, moved = name, moved + 1
    for name, child in model._modules.items():
        if name in gm._modules:
            gm._modules[name] = child
    if moved:
        gm.recompile()


def _attribute(root: Any, target: str) -> Any:
    for part in target.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def trace_call(model: nn.Module, arguments: dict[str, Any], frontend: str, options: dict) -> tuple[fx.GraphModule,
                                                                                                   CallSpec | None]:
    """One more call of a model already traced with `frontend`: (graph, spec) as `trace` gives them."""
    if frontend == "fx":
        return trace_fx(model, **options), None
    ep, spec = capture_export(model, arguments, lambda flat, leaves: _export_program(flat, leaves, {}))
    unlifted = ep.module()  # refuses .train()/.eval(); a plain GraphModule over its graph does not
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name=type(model).__name__)
    _read_through(gm, model, unlifted)
    drop_dtype_asserts(gm)
    gm.training = model.training
    return gm, spec
