"""Fold the LoRA branches of an ONNX file exported from an UNMERGED adapted model, without PyTorch.

    report = lora_fx.fold_onnx("unmerged.onnx", "merged.onnx")
    assert not report.rejected
    lora_fx.verify_onnx("base.onnx", "merged.onnx").identical   # base.onnx: the base model, same export settings

Each branch ``Add(base(x), s·(x·A)·B)`` becomes ``base(x)`` with ``W <- W + s·B·A`` (in W's layout), accumulated in
fp64 (fp32 on request) and rounded once into W's dtype; the rule and its refusals are in ``lora_fx.passes.onnx_fold_rule``.
The output file is written atomically (temporary file in the same directory, then a rename): a failed fold never
leaves a partial file and never clobbers an existing one. A model saved with external data is written with external
data (``<out>.data``; in place, the input's own data file).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any

import numpy as np
import onnx
from onnxscript import ir

from lora_fx.atomic import atomic_file
from lora_fx.errors import ExportError, InputError
from lora_fx.passes.onnx_fold import fold_lora_branches
from lora_fx.passes.onnx_fold_rule import FoldRecord

#: Above this many bytes of initializers the folded model is saved with its weights in ``<file>.data`` (protobuf
#: cannot hold more than 2 GB in one message).
EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclasses.dataclass
class FoldOnnxReport:
    """What fold_onnx did: `folded` branches merged into their base weights, `rejected` ones left in the graph
    (one line each: site and reason). ``ok`` is True when at least one branch was folded and none was refused."""

    folded: int
    rejected: list[str]
    kept: list[str] = dataclasses.field(default_factory=list)  # left unfolded on request (keep=...)
    weights: list[str] = dataclasses.field(default_factory=list)  # initializers that received a fold
    records: list[FoldRecord] = dataclasses.field(default_factory=list)
    removed_initializers: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    path: str = ""

    @property
    def ok(self) -> bool:
        return self.folded > 0 and not self.rejected

    def __str__(self) -> str:
        kept = f", {len(self.kept)} kept on request" if self.kept else ""
        lines = [f"ONNX fold: {self.folded} LoRA branch(es) folded, {len(self.rejected)} refused{kept}; nodes "
                 f"{self.nodes_before} -> {self.nodes_after}, {self.removed_initializers} initializers removed"
                 + (f" -> {self.path}" if self.path else "")]
        lines += [f"  - refused {line}" for line in self.rejected]
        return "\n".join(lines)


def fold_onnx(in_path: str | os.PathLike, out_path: str | os.PathLike, *,
              accumulate_dtype: Any = np.float64, keep: str | None = None) -> FoldOnnxReport:
    """Fold every LoRA branch of the ONNX file `in_path` into its base weight and write the result to `out_path`.

    Branches the rule refuses stay in the graph, unchanged, and are listed in ``report.rejected``; the file is
    still written (it computes the same function as the input). ``accumulate_dtype``: np.float64 (default: one
    rounding, at most half an ulp from the exact sum) or np.float32 (lora_fx.fold's default accumulation).
    ``keep``: a regular expression on module paths (e.g. ``"query|value"``); matching branches are left unfolded on
    purpose and listed in ``report.kept``. `out_path` may equal `in_path`.
    """
    in_path, out_path = pathlib.Path(in_path), pathlib.Path(out_path)
    model = _load(in_path)
    nodes_before, inits_before = len(model.graph), len(model.graph.initializers)
    try:
        result = fold_lora_branches(model, accumulate_dtype, keep)
    except (ValueError, re.error) as err:
        raise InputError(str(err), where="fold_onnx(accumulate_dtype=..., keep=...)",
                         fix="accumulate_dtype: np.float32 or np.float64; keep: a valid regular expression") from err
    _save(model, out_path, in_path)
    return FoldOnnxReport(
        folded=len(result.folded),
        rejected=result.rejected,
        kept=result.kept,
        weights=[r.weight for r in result.folded],
        records=result.folded,
        removed_initializers=inits_before - len(model.graph.initializers),
        nodes_before=nodes_before,
        nodes_after=len(model.graph),
        path=str(out_path),
    )


def _load(path: pathlib.Path) -> ir.Model:
    if not path.is_file():
        raise InputError("the ONNX file does not exist", where=str(path),
                         fix="export the unmerged adapted model first with lora_fx.export_onnx")
    try:
        return ir.load(str(path))
    except Exception as err:
        raise InputError(f"cannot read the ONNX file: {type(err).__name__}: {err}", where=str(path),
                         fix="pass an ONNX file written by lora_fx.export_onnx (or torch.onnx.export)") from err


def _external_files(model: ir.Model) -> set[pathlib.Path]:
    """The files the model's initializers are read from (external data), resolved."""
    return {pathlib.Path(v.const_value.path).resolve() for v in model.graph.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}


def _data_name(model: ir.Model, in_path: pathlib.Path, path: pathlib.Path) -> str | None:
    """Where the folded model's weights go: None (inside the .onnx), or the name of its external data file. A model
    read with external data is written with external data (`<out>.data`, or the input's own file when folding in
    place), as is one whose weights are too big for one protobuf."""
    inputs = _external_files(model)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if not inputs and size <= EXTERNAL_DATA_BYTES:
        return None
    in_place = path.resolve() == in_path.resolve()
    if in_place and len(inputs) == 1:
        (only,) = inputs
        if only.parent == path.resolve().parent:
            return only.name
    name = path.name + ".data"
    if not in_place and (path.parent / name).resolve() in inputs:
        raise ExportError(f"writing the folded model's weights to {name} would overwrite the external data the "
                          f"input {in_path.name} reads", where=str(path), fix="write the folded model under another "
                                                                              "name or into another folder")
    return name


def _save(model: ir.Model, path: pathlib.Path, in_path: pathlib.Path) -> None:
    """Write `model` to `path` atomically, with external data next to it when the input had it or the weights are
    too big for one file."""
    data_name = _data_name(model, in_path, path)
    with atomic_file(path) as tmp:
        target = tmp / path.name
        try:
            ir.save(model, str(target), external_data=data_name)
        except OSError as err:
            raise ExportError(f"writing the folded model failed: {type(err).__name__}: {err}", where=str(path),
                              fix="check the free disk space and the folder's permissions") from err
        except Exception as err:
            raise ExportError(f"serializing the folded model failed: {type(err).__name__}: {err}", where=str(path),
                              fix="if the input model is valid (onnx.checker.check_model), report this as a lora_fx "
                                  "bug with the input file") from err
        try:
            onnx.checker.check_model(str(target))
        except Exception as err:
            raise ExportError(f"the folded model does not pass the ONNX checker: {type(err).__name__}: {err}",
                              where=str(path), fix="check the input with onnx.checker.check_model; if it passes, "
                                                   "report this as a lora_fx bug with the input file") from err
