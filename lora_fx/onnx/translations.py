"""ONNX translations for ops the exporter has none for, used by every export alike (base, merged, unmerged).

transformers runs mixture-of-experts layers through a grouped matmul (``experts_implementation="grouped_mm"``, the
default): in torch.export graphs it is the custom op ``transformers::grouped_mm_fallback(x, W, offs)``, for which
torch.onnx has no translation, so neither the base model nor the merged one exported. Its meaning is simple: the
rows of x are sorted by expert, ``offs`` holds each expert's end row, and row r is multiplied by W[e] for the e
whose range holds r. In ONNX: e = the number of ends at or before r (a comparison and a sum), then a Gather of the
experts' weights and a batched MatMul. The same translation serves base and merged files, so they stay identical.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def _grouped_mm(x, weight, offs):
    """(S, in) rows sorted by expert, (E, in, out) weights, (E,) end offsets -> (S, out)."""
    from onnx import TensorProto
    from onnxscript import opset18 as op

    rows = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(x, start=0, end=1)), op.Constant(value_int=1))
    ends = op.Unsqueeze(op.Cast(offs, to=TensorProto.INT64), op.Constant(value_ints=[0]))  # (1, E)
    passed = op.GreaterOrEqual(op.Unsqueeze(rows, op.Constant(value_ints=[1])), ends)  # (S, E): row r past end e
    expert = op.ReduceSum(op.Cast(passed, to=TensorProto.INT64), op.Constant(value_ints=[1]), keepdims=0)  # (S,)
    per_row = op.Gather(weight, expert, axis=0)  # (S, in, out)
    product = op.MatMul(op.Unsqueeze(x, op.Constant(value_ints=[1])), per_row)  # (S, 1, out)
    return op.Squeeze(product, op.Constant(value_ints=[1]))


def custom_translations() -> dict[Any, Callable]:
    """The translations for the ops of this process that have one here (an op exists once its library loaded)."""
    table: dict[Any, Callable] = {}
    transformers_ops = getattr(torch.ops, "transformers", None)
    try:
        table[transformers_ops.grouped_mm_fallback.default] = _grouped_mm
    except AttributeError:  # transformers not imported, or a version without the op
        pass
    return table
