"""Run exported ONNX models in ONNX Runtime: sessions, inference, parity against torch, timing.

ONNX Runtime silently falls back to CPU when its CUDA provider cannot load, which would make benchmarks and parity
checks lie about where they ran. So sessions here say which provider is active, "cuda" fails loudly when CUDA is not
usable, and "auto" warns when it falls back.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from lora_fx.errors import InputError, LoraFxError
from lora_fx.passes.trace import eval_mode, leaves

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# Default (atol, rtol) per output dtype; check_parity's docstring gives the reasons.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-7),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
    "integer": (0.0, 0.0),
}
_PRECISION_ORDER = ["integer", "float64", "float32", "float16", "bfloat16"]  # later = looser

# ONNX tensor type strings of session inputs -> numpy dtypes, to cast floating inputs to what the model expects.
_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def ort_session(path: str | os.PathLike, device: str = "auto", *, tf32: bool = False) -> ort.InferenceSession:
    """An InferenceSession on `device`: "cpu", "cuda" (error if CUDA is unusable) or "auto" (CUDA, else CPU with a warning).

    The active provider is ``session.get_providers()[0]``. ONNX Runtime's CUDA provider runs fp32 MatMul in TF32 by
    default (10-bit mantissa: errors of ~1e-3 against PyTorch, seen on an H200); tf32=False turns that off so fp32
    parity holds at fp32 tolerances.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise InputError(f"unknown device {device!r}", where="ort_session(device=...)", fix='use "auto", "cuda" or "cpu"')
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError("the ONNX file does not exist", where=path, fix="export the model first with lora_fx.export_onnx")
    if device == "cpu":
        return _session(path, [CPU])

    reason = _cuda_unavailable_reason()
    session = _session(path, [(CUDA, {"use_tf32": "1" if tf32 else "0"}), CPU]) if reason is None else None
    if session is not None and CUDA not in session.get_providers():
        reason = "onnxruntime could not load its CUDA provider (CUDA 13 / cuDNN 9 libraries missing or not loadable)"
    if reason is None:
        return session
    if device == "cuda":
        raise LoraFxError(
            f"CUDA was requested but is not usable: {reason}",
            where=path,
            fix='install onnxruntime-gpu with the CUDA and cuDNN libraries it needs (torch with CUDA provides them via '
            'onnxruntime.preload_dlls()), run on a machine with an NVIDIA GPU, or pass device="cpu"',
        )
    warnings.warn(f"ONNX Runtime is running {path} on CPU: {reason}", RuntimeWarning, stacklevel=2)
    return session if session is not None else _session(path, [CPU])


def run_onnx(
    session_or_path: ort.InferenceSession | str | os.PathLike,
    example_inputs: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
    device: str = "auto",
) -> list[np.ndarray]:
    """Run the model on torch/numpy inputs and return its outputs as numpy arrays.

    Tensors are matched to the session's inputs the way the exporter flattened them: keyword inputs by name,
    positional tensors (nested tuples/lists flattened) in order for the rest; non-tensor arguments are skipped.
    On CUDA, inputs are copied to the device once and outputs bound on the device (IO binding).
    """
    session = _as_session(session_or_path, device)
    feed = _feed(session, example_inputs, example_kwargs)
    if CUDA in session.get_providers():
        binding = _bind(session, feed)
        session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())
    return session.run(None, feed)


@dataclasses.dataclass
class OutputParity:
    """Comparison of one output: ONNX vs torch."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_err: float
    max_rel_err: float
    ok: bool
    note: str = ""


@dataclasses.dataclass
class ParityReport:
    """Outcome of check_parity: ok when every output is within atol + rtol * |torch|."""

    ok: bool
    max_abs_err: float
    max_rel_err: float
    atol: float
    rtol: float
    provider: str
    outputs: list[OutputParity]

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        lines = [f"ONNX vs torch parity: {'OK' if self.ok else 'FAILED'} on {self.provider} "
                 f"(atol={self.atol:g}, rtol={self.rtol:g}; max abs err {self.max_abs_err:.3g}, "
                 f"max rel err {self.max_rel_err:.3g})"]
        rows = [("output", "shape", "dtype", "max abs", "max rel", "")] + [
            (o.name, str(o.shape), o.dtype, f"{o.max_abs_err:.3g}", f"{o.max_rel_err:.3g}",
             ("ok" if o.ok else "FAIL") + (f" ({o.note})" if o.note else "")) for o in self.outputs]
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines)


def check_parity(
    onnx_path: str | os.PathLike,
    module: torch.nn.Module,
    example_inputs: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    device: str = "auto",
) -> ParityReport:
    """Run the ONNX model in ONNX Runtime and `module` in torch (eval, no_grad) on the same inputs; compare all outputs.

    Torch outputs are flattened in order (tuples, lists, dicts by insertion order, HF ModelOutput via to_tuple()),
    which is how the exporter orders ONNX outputs. Floating inputs are cast to the dtype each ONNX input declares, so
    an fp16 export can be checked against the fp32 module on fp32 inputs. An element passes when
    |onnx - torch| <= atol + rtol * |torch|. Unless given, atol and rtol come from the least precise dtype among the
    outputs of either side (DEFAULT_TOLERANCES):

    ========  =====  =====  =========================================================================
    dtype     atol   rtol   why
    ========  =====  =====  =========================================================================
    float64   1e-7   1e-7   same math in other kernels: only the summation order differs
    float32   1e-4   1e-4   other kernels and summation order; TF32 and fused kernels on GPU
    float16   1e-2   1e-2   10-bit mantissa (eps ~1e-3); rounding of intermediates adds up over layers
    bfloat16  5e-2   5e-2   7-bit mantissa (eps ~8e-3)
    integer   0      0      ids, argmax, masks: must match exactly
    ========  =====  =====  =========================================================================

    max_rel_err is |onnx - torch| / |torch| over the elements where |torch| > atol (the relative error of
    near-zero values says nothing).
    """
    from lora_fx.onnx.export import without_cache_output  # export_onnx's default: no KV cache in the outputs

    session = _as_session(onnx_path, device)
    example_kwargs = without_cache_output(module, dict(example_kwargs or {}))
    onnx_outputs = run_onnx(session, example_inputs, example_kwargs)
    args = (example_inputs,) if _is_array(example_inputs) else tuple(example_inputs)
    torch_outputs, torch_precisions = _torch_outputs(module, args, example_kwargs)
    names = [o.name for o in session.get_outputs()]
    if len(torch_outputs) != len(onnx_outputs):
        raise InputError(
            f"the ONNX model has {len(onnx_outputs)} outputs {names} but the module returns {len(torch_outputs)} tensors",
            where=f"{os.fspath(onnx_path)} vs {type(module).__name__}",
            fix="compare the module the file was exported from (same forward and output structure)",
        )
    default_atol, default_rtol = _default_tolerance({_precision(a.dtype) for a in onnx_outputs} | torch_precisions)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    outputs = [_compare(name, got, want, atol, rtol) for name, got, want in zip(names, onnx_outputs, torch_outputs)]
    return ParityReport(
        ok=all(o.ok for o in outputs),
        max_abs_err=max((o.max_abs_err for o in outputs), default=0.0),
        max_rel_err=max((o.max_rel_err for o in outputs), default=0.0),
        atol=atol,
        rtol=rtol,
        provider=session.get_providers()[0],
        outputs=outputs,
    )


def time_session(
    session: ort.InferenceSession,
    inputs: Mapping[str, Any] | tuple,
    warmup: int = 3,
    iters: int = 20,
) -> list[float]:
    """Seconds per iteration of `iters` timed runs after `warmup` untimed ones.

    `inputs` is a name -> array mapping or example inputs as for run_onnx. On CUDA, inputs live on the device and
    outputs are bound there (IO binding), and each run is synchronised before the clock stops, so the times are
    device compute plus launch, without host copies.
    """
    if isinstance(inputs, Mapping):
        feed = {name: _to_numpy(value) for name, value in inputs.items()}
    else:
        feed = _feed(session, inputs, None)
    if CUDA in session.get_providers():
        binding = _bind(session, feed)

        def run() -> None:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
    else:

        def run() -> None:
            session.run(None, feed)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def _session(path: str, providers: list) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(path, providers=providers)
    except Exception as err:  # InvalidProtobuf, InvalidGraph, NoSuchFile, NotImplemented, ... from onnxruntime
        if type(err).__name__ == "NotImplemented" or "NOT_IMPLEMENTED" in str(err):
            raise InputError(f"ONNX Runtime has no kernel for an op of this file on {providers}: {err}", where=path,
                             fix="the file is valid, but these providers do not implement that op for its dtype "
                                 "(float64 often lacks kernels: Erf, LayerNorm, ...): export the model in float32 "
                                 "(model.float()) or bfloat16/float16 for the GPU") from err
        raise InputError(f"ONNX Runtime cannot load the file: {type(err).__name__}: {err}", where=path,
                         fix="give a file written by lora_fx.export_onnx (a truncated or non-ONNX file cannot run)"
                         ) from err


def _as_session(session_or_path: ort.InferenceSession | str | os.PathLike, device: str) -> ort.InferenceSession:
    if isinstance(session_or_path, ort.InferenceSession):
        return session_or_path
    return ort_session(session_or_path, device)


def _cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot work here, or None if it may: checked without asking ORT, whose failed attempt logs errors."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDAExecutionProvider (install onnxruntime-gpu)"
    devices = _cuda_device_count()
    if devices is None:
        return "no NVIDIA driver found (the CUDA driver library could not be loaded)"
    if devices == 0:
        return "the NVIDIA driver reports no usable GPU"
    if hasattr(ort, "preload_dlls"):  # loads the CUDA/cuDNN libraries that pip-installed torch ships; prints failures
        with contextlib.redirect_stdout(io.StringIO()):
            ort.preload_dlls()
    return None


def _cuda_device_count() -> int | None:
    """GPUs the CUDA driver sees, or None when there is no driver."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return None
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _feed(session: ort.InferenceSession, args: tuple, kwargs: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """Map example inputs to the session's input names: keywords by name, positional tensors in order."""
    specs = session.get_inputs()
    args = (args,) if _is_array(args) else tuple(args)
    kwargs = dict(kwargs or {})
    feed: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name in kwargs and _is_array(kwargs[spec.name]):
            feed[spec.name] = _to_numpy(kwargs.pop(spec.name), spec.type)
    positional = [value for value in leaves(args) if _is_array(value)]
    positional += [value for value in leaves(list(kwargs.values())) if _is_array(value)]  # nested keyword inputs
    remaining = [spec for spec in specs if spec.name not in feed]
    if len(positional) != len(remaining):
        expected = ", ".join(f"{s.name}: {s.type}{s.shape}" for s in specs)
        raise InputError(
            f"got {len(positional) + len(feed)} tensor inputs but the ONNX model takes {len(specs)} ({expected})",
            where="run_onnx example inputs",
            fix="pass the same example inputs (positional and keyword) that the model was exported with",
        )
    for spec, value in zip(remaining, positional):
        feed[spec.name] = _to_numpy(value, spec.type)
    return feed


def _bind(session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> ort.IOBinding:
    """IO binding with inputs copied to the GPU once and outputs allocated on the GPU."""
    binding = session.io_binding()
    for name, array in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", 0)
    return binding


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _to_numpy(value: Any, onnx_type: str | None = None) -> np.ndarray:
    """A numpy copy of a tensor; floating values are cast to the float type the ONNX input declares."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    target = _ORT_FLOAT_TYPES.get(onnx_type or "")
    if target is not None and np.issubdtype(array.dtype, np.floating) and array.dtype != target:
        array = array.astype(target)
    return array


def _torch_outputs(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[list[np.ndarray], set[str]]:
    """The module's tensor outputs (eval mode, no grad) flattened to numpy, and their precisions; flags restored."""
    with eval_mode(module), torch.no_grad():
        result = module(*args, **kwargs)
    tensors = [leaf for leaf in leaves(result) if isinstance(leaf, torch.Tensor)]
    precisions = {str(t.dtype).removeprefix("torch.") if t.is_floating_point() else "integer" for t in tensors}
    precisions = {p if p in DEFAULT_TOLERANCES else "float32" for p in precisions}
    return [_to_numpy(t) for t in tensors], precisions


def _precision(dtype: np.dtype) -> str:
    """The DEFAULT_TOLERANCES key of a numpy dtype."""
    if dtype in (np.float64, np.float32, np.float16):
        return str(np.dtype(dtype))
    return "integer" if np.issubdtype(dtype, np.integer) or dtype == np.bool_ else "float32"


def _default_tolerance(precisions: set[str]) -> tuple[float, float]:
    """The tolerance of the least precise dtype present."""
    loosest = max(precisions or {"float32"}, key=_PRECISION_ORDER.index)
    return DEFAULT_TOLERANCES[loosest]


def _compare(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> OutputParity:
    dtype = f"{got.dtype}/{want.dtype}" if got.dtype != want.dtype else str(got.dtype)
    if got.shape != want.shape:
        return OutputParity(name, tuple(got.shape), dtype, math.inf, math.inf, False,
                            f"shape {tuple(got.shape)} vs torch {tuple(want.shape)}")
    a, b = got.astype(np.float64), want.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    err = np.where(both_nan, 0.0, np.abs(a - b))
    err = np.where(np.isnan(err), np.inf, err)  # NaN on one side only
    max_abs = float(err.max()) if err.size else 0.0
    significant = np.abs(b) > atol
    max_rel = float((err[significant] / np.abs(b[significant])).max()) if significant.any() else 0.0
    ok = bool(np.all(err <= atol + rtol * np.abs(np.nan_to_num(b))))
    return OutputParity(name, tuple(got.shape), dtype, max_abs, max_rel, ok)
