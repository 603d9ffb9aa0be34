"""Export a model to ONNX with one fixed set of exporter settings.

Folding LoRA is only proven correct if the merged model's ONNX graph is structurally identical to the base
model's. The dynamo exporter's output depends on its settings (opset, graph optimisation), so both exports must go
through this one function. The file is written atomically: a failed export leaves nothing behind and never
clobbers a previous file at the same path.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import logging
import os
import pathlib
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree

from lora_fx.atomic import atomic_file
from lora_fx.errors import ExportError, InputError
from lora_fx.onnx.translations import custom_translations
from lora_fx.onnx.names import axis_names, dynamic_specs, name_interface, output_names, without_pinned
from lora_fx.passes.causal_attention import with_masked_attention
from lora_fx.passes.trace import eval_mode

#: ONNX opset of every export. 20 is the default of the dynamo exporter in torch 2.9 through 2.13; stating it keeps
#: base and merged exports comparable even if a later torch changes its default.
OPSET = 20

# how torch.export says that a dim marked dynamic cannot be (the model pins its size)
_DIM_CONFLICT = re.compile(r"static shape|specializ|Constraints violated|dim hint|marked .* as dynamic", re.I)

# torch's root logger: the exporter, torch.export and dynamo log progress, graph dumps and duplicate tracebacks
# under it; the error that matters is raised as an ExportError anyway.
_NOISY_LOGGERS = ("torch",)


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = False,
    dynamic_shapes: Any = None,
    dtype: torch.dtype | None = None,
    kv_cache: bool = False,
) -> pathlib.Path:
    """Export `model` to the ONNX file `path` and return the path.

    The export runs in eval mode with ``torch.onnx.export(dynamo=True, opset_version=OPSET)`` and onnxscript's
    default optimisation except value-based initializer deduplication (see ``_optimize``).
    ``dynamic=True`` makes dim 0 of every tensor input dynamic (named ``batch``) and dim 1 of token ids, masks and
    (batch, sequence, features) inputs (``sequence``; a second sequence of independent length, as an
    encoder-decoder's, is ``<input>_sequence``), where the model allows it; outputs are named after the
    model's output fields (``logits``, ``last_hidden_state``, ...; lora_fx.onnx.names).
    ``dynamic_shapes`` is passed through as ``torch.export`` expects it and wins over ``dynamic``.
    ``dtype`` (e.g. ``torch.float16``) exports a cast copy of the model (an adapted model's copy captures its graph
    again in that dtype) and of the floating inputs; the caller's model is not changed. A bare torch.export
    GraphModule cannot change dtype (its graph keeps the casts it was traced with): InputError.
    ``kv_cache=True`` (decoder LMs) exports one file for prefill and one-token steps with the cache as inputs and
    outputs (``past_key_values.{i}.key/value`` -> ``present.{i}.key/value``, lora_fx.onnx.kv_cache); every size is
    dynamic and the example inputs are made from the model's config, so none need be given.
    Models over the exporter's size limit get their weights in an external ``.data`` file next to the ``.onnx``;
    smaller ones come out as one self-contained file.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}", where="export_onnx(model=...)",
                         fix="pass the model object itself (an nn.Module, e.g. the result of lora_fx.fold)")
    _refuse_quantized_base(model)
    path = pathlib.Path(path)
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    example_kwargs = dict(example_kwargs or {})

    if dtype is not None:
        _check_castable(model, dtype)
        model, example_inputs, example_kwargs = _cast(model, example_inputs, example_kwargs, dtype)
    if kv_cache:
        return _export_with_cache(model, path)
    example_kwargs = without_cache_output(model, example_kwargs)
    if dynamic and dynamic_shapes is None:
        example_inputs, example_kwargs = _wide_examples(model, example_inputs, example_kwargs)
    model, example_inputs, example_kwargs = _exportable(model, example_inputs, example_kwargs)
    with atomic_file(path) as tmp_dir:
        with eval_mode(model):
            outputs = output_names(_check_inputs_fit(model, example_inputs, example_kwargs))
            specs = [dynamic_shapes]
            if dynamic_shapes is None and dynamic:
                specs = dynamic_specs(model, example_inputs, example_kwargs)
            _export_first_that_fits(model, tmp_dir / path.name, example_inputs, example_kwargs, specs, path,
                                    outputs)
    return path


def without_cache_output(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs with use_cache=False for a transformers model whose config turns the KV cache on (the default of every
    decoder LM) and a forward that takes use_cache, unless the caller chose: the cache object in its outputs has no
    ONNX form, and a file with a cache is kv_cache=True's."""
    from lora_fx.adapted import is_adapted, user_model

    plain = user_model(model) if is_adapted(model) else model
    if "use_cache" in kwargs or not getattr(getattr(plain, "config", None), "use_cache", False):
        return kwargs
    try:
        takes = "use_cache" in inspect.signature(plain.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    return {**kwargs, "use_cache": False} if takes else kwargs


def _refuse_quantized_base(model: torch.nn.Module) -> None:
    """A base quantized by lora_fx.quantize_base computes through lora_fx's own NF4/FP8 ops, which ONNX has no
    translation for; what ships is the folded model (plain weights, the base's graph)."""
    from lora_fx.nf4 import is_nf4
    from lora_fx.state import find_state, unwrap

    state = find_state(unwrap(model))
    quantized = [n for n, p in model.named_parameters() if is_nf4(p)]
    if (state is not None and state.quantized) or quantized:
        raise ExportError("the model's base weights are quantized (lora_fx.quantize_base): ONNX export takes plain "
                          "weights", where=quantized[0] if quantized else type(model).__name__,
                          fix="export lora_fx.fold(adapted): the merged model has the base's weights, dtype and graph")


def _export_with_cache(model: torch.nn.Module, path: pathlib.Path) -> pathlib.Path:
    """export_onnx(kv_cache=True): the model (an adapted one through the graph of a call with a cache) wrapped in
    CacheDecoder, exported with the cache's layout and names (lora_fx.onnx.kv_cache)."""
    from lora_fx.adapted import is_adapted, user_model
    from lora_fx.onnx.kv_cache import CacheDecoder, example_step, name_io

    user = user_model(model) if is_adapted(model) else model
    with eval_mode(model):
        example = example_step(user)
        inner, _, _ = _exportable(model, (), example.call_kwargs())
    wrapper = CacheDecoder(inner)
    spec = example.dynamic_shapes()

    def names(onnx_model) -> None:
        name_io(onnx_model, example)
        name_interface(onnx_model, example.axis_names(), example.output_names())
        onnx_model.metadata_props.update(generation_metadata(user))

    with atomic_file(path) as tmp_dir, eval_mode(wrapper):
        try:
            _check_inputs_fit(wrapper, example.args(), {})
        except InputError as err:
            raise _window_error(user, example, err) or err
        _export(wrapper, tmp_dir / path.name, example.args(), {}, spec, path, names)
    return path


def generation_metadata(model: torch.nn.Module) -> dict[str, str]:
    """What model.generate would stop and pad with (its generation_config), as ONNX metadata_props, so that
    lora_fx.generate_onnx on the file stops where generate does without being told."""
    config = getattr(model, "generation_config", None)
    out = {}
    for key in ("eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
            out[f"lora_fx.{key}"] = json.dumps(value)
    return out


def _window_error(model: torch.nn.Module, example: Any, err: InputError) -> InputError | None:
    """A clearer error when the export's example step cannot fit the model's sliding window (Gemma 2's hybrid cache
    keeps window - 1 tokens on its sliding layers, so their cache and the full layers' disagree in length)."""
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    cached, new = max(t.shape[-2] for t in example.past), example.input_ids.shape[-1]
    if not isinstance(window, int) or window >= cached + new:
        return None
    return InputError(f"kv_cache=True traces one step of {new} new tokens after {cached} cached ones, more than the "
                      f"model's sliding_window={window}, and the model's forward fails on it: {err.what}",
                      where=f"export_onnx({type(model).__name__}, kv_cache=True)",
                      fix=f"export with kv_cache=False, or from a model whose sliding_window is at least "
                          f"{cached + new} (real checkpoints use thousands of tokens; the step's sizes must differ "
                          f"from each other and from 0, 1 and the batch, so they cannot shrink further)")


def _exportable(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, tuple, dict]:
    """(what to hand the exporter, its inputs). An adapted model (unmerged) is exported through its graph for this
    call (lora_fx.adapted.exportable); the causal-attention rewrite is for training, so the graph's masked
    attention comes back: the unmerged export differs from the base export only by the LoRA branches, which
    fold_onnx removes."""
    from lora_fx.adapted import exportable, is_adapted

    if not is_adapted(model):
        return with_masked_attention(model), args, kwargs
    from lora_fx.api import _entry

    with eval_mode(model):
        entry = _entry(model, args, kwargs)
    graph, arguments = exportable(entry, model, model.__dict__["_lora_fx_calls"].bind(args, kwargs))
    if isinstance(graph, torch.fx.GraphModule):
        graph = with_masked_attention(graph)
    if entry.spec is None:
        return graph, args, kwargs
    return graph, (), arguments


def _check_inputs_fit(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Run the model's own forward once, so bad example inputs fail with a clear error instead of an exporter trace.
    Returns the outputs (their structure names the ONNX outputs)."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as err:
        raise InputError(
            f"the example inputs do not fit the model: its forward fails with {type(err).__name__}: {err}",
            where=f"{type(model).__name__}.forward with inputs {_describe(args, kwargs)}",
            fix="pass example inputs that the model's forward accepts (check shapes, dtypes and argument names)",
        ) from err


def _cast(
    model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], dtype: torch.dtype
) -> tuple[torch.nn.Module, tuple, dict[str, Any]]:
    """A copy of the model cast to `dtype`, with floating inputs cast to match (integer inputs such as ids stay)."""
    if not dtype.is_floating_point:
        raise InputError(
            f"dtype {dtype} is not a floating dtype", where="export_onnx(dtype=...)", fix="use torch.float16, torch.bfloat16 or None"
        )
    cast = copy.deepcopy(model).to(dtype)

    def cast_value(value: Any) -> Any:
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return cast, _map_structure(cast_value, args), _map_structure(cast_value, kwargs)


def _check_castable(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """A torch.export graph (aten ops) keeps the dtype casts it was traced with: cast to another dtype, it would mix
    dtypes (ONNX Runtime then refuses the file). Refuse it, saying what can be exported in `dtype` instead."""
    if not isinstance(model, torch.fx.GraphModule):
        return
    traced = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if traced - {dtype} and any(isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes):
        raise InputError(
            f"export_onnx(dtype={dtype}) of a torch.export graph traced with {sorted(map(str, traced))} weights: the "
            f"graph keeps the casts it was traced with, so it cannot change dtype",
            where=f"export_onnx({type(model).__name__}, dtype={dtype})",
            fix="export the adapted model itself (what lora_fx.adapt returned) or lora_fx.fold(adapted) (a model of "
                "your class): both are captured again in the new dtype. Or trace the model in that dtype")


def _export(
    model: torch.nn.Module,
    target: pathlib.Path,
    args: tuple,
    kwargs: dict[str, Any],
    dynamic_shapes: Any,
    path: pathlib.Path,
    name_interface: Callable[[Any], None] = lambda model: None,
) -> None:
    """Run the dynamo exporter with the fixed settings, quietly; any failure becomes an ExportError.

    Under torch.no_grad(): with autograd on, the exporter's decomposition step fails on models with windowed or
    relative-position attention (transformers' Swin: "Cannot view a tensor with shape ... and strides ..."), and an
    export needs no gradients anyway."""
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                model,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                optimize=False,  # _optimize below: the exporter's optimisation minus value-based deduplication
                opset_version=OPSET,
                dynamic_shapes=_unnamed(dynamic_shapes),
                verbose=False,
                report=False,
                custom_translation_table=custom_translations() or None,
            )
            _optimize(program.model)
            name_interface(program.model)
            program.save(str(target), external_data=False)  # still external for models over ~1.5 GB
    except Exception as err:
        raise ExportError(
            f"torch.onnx.export failed for {type(model).__name__}: {_summary(err)}", where=str(path), fix=_export_fix(err)
        ) from err
    if not target.is_file():
        raise ExportError("torch.onnx.export returned without writing a file", where=str(path), fix="report this as a bug")


def _unnamed(dynamic_shapes: Any) -> Any:
    """dynamic_shapes with every axis name (a string) as Dim.DYNAMIC. torch.onnx gives a named axis its name in the
    file, so two axes of one name but of independent sizes (an encoder-decoder's two sequences) would read as one
    size to ONNX Runtime; unnamed, they keep the exporter's symbols (one per size torch.export tells apart), which
    name_interface then names."""
    if dynamic_shapes is None:
        return None
    return pytree.tree_map(lambda d: torch.export.Dim.DYNAMIC if isinstance(d, str) else d, dynamic_shapes)


def _export_first_that_fits(model: torch.nn.Module, target: pathlib.Path, args: tuple, kwargs: dict[str, Any],
                            specs: list[Any], path: pathlib.Path, outputs: list[str]) -> None:
    """_export with the first dynamic_shapes of `specs` that the model allows: a dim it pins to one size (an MLP's
    features, a ViT's channels) is dropped and the export tried again; then the next spec."""
    specs = list(specs)
    spec = specs.pop(0)
    while True:
        try:
            return _export(model, target, args, kwargs, spec, path,
                           lambda onnx_model: name_interface(onnx_model, axis_names(spec), outputs))
        except ExportError as err:
            fewer = without_pinned(spec, str(err.__cause__ or err)) if isinstance(spec, dict) else None
            if fewer is not None:
                spec = fewer
            elif specs and _DIM_CONFLICT.search(str(err)):
                spec = specs.pop(0)
            else:
                raise


def _wide_examples(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """The example inputs with every dim export_onnx(dynamic=True) makes dynamic at least 2 long (the example
    repeated along it), when the model's forward takes them so (else the inputs as given). torch.export specializes
    a dynamic dim whose example is 1 long; torch 2.11 does it silently, keeping the name on the input while the graph
    computes with 1, so the file fails at any other batch size. The forward run also captures an adapted model's
    graph for these inputs, which the export then takes."""
    import inspect

    spec = dynamic_specs(model, args, kwargs)[0]
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    changed = False
    for name, axes in spec.items():
        value = bound.arguments.get(name)
        if isinstance(value, torch.Tensor) and isinstance(axes, dict):
            for axis in [a for a in axes if isinstance(a, int) and value.shape[a] == 1]:
                value, changed = torch.cat([value, value], dim=axis), True
            bound.arguments[name] = value
    if not changed:
        return args, kwargs
    try:
        with eval_mode(model), torch.no_grad():
            model(*bound.args, **bound.kwargs)
    except Exception:  # the model takes only these sizes: export as given (torch.export then pins the dim)
        return args, kwargs
    return bound.args, bound.kwargs


def _optimize(model) -> None:
    """What ``torch.onnx.export(optimize=True)`` runs (onnxscript's ``optimize_ir``), except that weight matrices
    are never merged by value (see ``_deduplicate_constants``)."""
    import onnx_ir.passes.common as common
    from onnxscript import optimizer, rewriter

    cleanup = [common.RemoveUnusedNodesPass, common.RemoveUnusedFunctionsPass, common.RemoveUnusedOpsetsPass]
    common.InlinePass()(model)
    rules = _structural_rules(rewriter)
    for _ in range(2):  # optimize_ir's default num_iterations
        optimizer.fold_constants_ir(model, onnx_shape_inference=True)
        rewriter.rewrite(model, pattern_rewrite_rules=rules)
        for cleanup_pass in cleanup:
            cleanup_pass()(model)
    common.RemoveUnusedNodesPass()(model)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common.LiftSubgraphInitializersToMainGraphPass()(model)
    _deduplicate_constants(model)
    common.CommonSubexpressionEliminationPass()(model)
    for name in ("OutputFixPass", "NameFixPass"):  # newer onnx_ir only
        if hasattr(common, name):
            getattr(common, name)()(model)


def _structural_rules(rewriter) -> list | None:
    """onnxscript's default rewrite rules minus those that look at a weight's values: the removal of an all-zero
    bias (Gemm, Conv) and of Add(x, 0) / Mul(x, 1) no-ops. A bias that is zero in the base and trained in the
    merged model (modules_to_save) would otherwise change the merged export's structure. None (the defaults) where
    this onnxscript lays its rules out otherwise."""
    defaults = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    value_rules = [rule for name in ("_no_op", "_remove_optional_bias")
                   for rule in getattr(getattr(rewriter, name, None), "rules", [])]
    if defaults is None or not value_rules:
        return None
    return [rule for rule in defaults if rule not in value_rules]


def _deduplicate_constants(model, size_limit: int = 1024) -> None:
    """onnx_ir's DeduplicateInitializersPass (one initializer for equal tensors of <= 1024 elements), sparing
    floating-point tensors of 2 or more dims: weight matrices and what constant folding made of them (W.T).

    Merging those by value would make the export's structure depend on weight values: a fresh model whose layers
    are deep copies would export with shared weights, and the same model after a LoRA fold (weights now differ)
    with separate ones, and verify would call them different. Shapes, scalars, norms' weights and biases are
    merged as usual; models of real size have no weight matrix that small, so their export is the exporter's."""
    for graph in model.graphs():
        first: dict[tuple, Any] = {}
        for init in tuple(graph.initializers.values()):
            value = init.const_value
            if (value is None or value.size > size_limit or value.dtype.is_string()
                    or (value.dtype.is_floating_point() and len(value.shape) >= 2)
                    or init.is_graph_input() or init.is_graph_output()):
                continue
            key = (value.dtype, tuple(value.shape), value.tobytes())
            if key in first:
                init.replace_all_uses_with(first[key])
                graph.initializers.pop(init.name)
            else:
                first[key] = init


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress prints, its log lines and its deprecation warnings for the duration."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        # torch.export prints partial graphs of failed exports straight to sys.stderr
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*torchvision.*")
            # inputs sharing a dim (batch of ids and mask) share one ONNX dim name; that is what we want
            warnings.filterwarnings("ignore", message="# The axis name: .* will not be used")
            # torch.export's unlifted modules cannot be put in eval mode (see passes.trace.eval_mode); the warning is moot
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _map_structure(fn: Any, value: Any) -> Any:
    """Apply `fn` to every leaf of nested tuples, lists and dicts, keeping the structure."""
    if isinstance(value, dict):
        return {key: _map_structure(fn, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_map_structure(fn, item) for item in value)
    return fn(value)


def _describe(args: tuple, kwargs: dict[str, Any]) -> str:
    """Shapes and dtypes of the example inputs, for error messages."""

    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
        if isinstance(value, (list, tuple)):
            return "(" + ", ".join(one(item) for item in value) + ")"
        return type(value).__name__

    parts = [one(arg) for arg in args] + [f"{key}={one(value)}" for key, value in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _export_fix(err: Exception) -> str:
    """Advice for the exporter stage that failed: capturing the graph (torch.export) or translating it to ONNX."""
    if "step 1/3" in _plain(err) or "torch.export" in _plain(err).split("\n", 1)[0]:
        return ("make torch.export.export(model, args, strict=False) succeed first: replace data-dependent Python "
                "control flow with torch.where/torch.cond; with dynamic shapes, use example inputs whose batch and "
                "sequence sizes are at least 2 and differ from the other dims")
    return ("the model uses an op the ONNX exporter cannot translate (named above): rewrite that part of the model "
            "with ops the exporter supports")


def _plain(err: Exception) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(err))


def _summary(err: Exception) -> str:
    """The useful part of an exporter error: its exception summary, without colour codes or advice boilerplate."""
    text = _plain(err)
    match = re.search(r"## Exception summary\s*(.*?)\s*(\(Refer to|$)", text, re.S)
    summary = match.group(1) if match else text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return summary.strip()
