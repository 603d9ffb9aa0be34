"""The harness: the steps the tests (tests/test_models.py) and the coverage table (benchmarks/coverage.py) run on one
(model, front end) case, so both measure exactly the same thing.

``Case.run`` does adapt -> 3 AdamW steps -> fold -> ONNX export of the base model and of the merged one ->
verify_onnx -> ONNX Runtime parity, recording every number in a ``CaseResult``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .catalogue import OTHER_BATCH, OTHER_SEQ, SEQ, Entry

# ------------------------------------------------------------------------------------------------ the pipeline
# Fold parity tolerance, relative to the output's scale (max |y|, at least 1). Folding changes the order of the
# floating-point sums: x·(W0 + s·B·A)ᵀ is rounded once per weight, x·W0ᵀ + s·((x·Aᵀ)·Bᵀ) rounds its two products and
# their sum separately. Each matmul of K = 32..64 terms is off by about K·eps relative (fp32 eps = 1.2e-7: ~4e-6),
# and 2 layers with residuals, normalisations and softmax carry that to the output: 1e-5 relative holds with
# margin in fp32 while a fold that dropped or doubled a LoRA (delta ~1e-2 after 3 steps at lr 1e-2) is far above.
# bf16 weights (--dtype bfloat16) round W0 + delta to 8 bits of mantissa once (eps = 7.8e-3): 5e-2 relative.
FOLD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
ORT_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
STEPS, LR = 3, 1e-2


def first_output(out) -> torch.Tensor:
    """The first tensor of a model's output (logits, last_hidden_state, ...)."""
    from lora_fx.passes.trace import flatten_outputs
    tensors = flatten_outputs(out)
    if not tensors:
        raise TypeError(f"the model returned no tensor ({type(out).__name__})")
    return tensors[0]


def to_device(value, device, dtype=None):
    """Tensors of nested args/kwargs to `device`; floating ones to `dtype` too (ids and masks keep theirs)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device, dtype) for v in value)
    return value


def max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, output scale max(1, max |b|)), in fp32."""
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).abs().max().item(), max(1.0, b.abs().max().item())


class Loss:
    """A fixed task on the example batch: cross-entropy to fixed random labels for LMs, MSE to a fixed random
    target otherwise. Fixed (seeded) so the first and last loss are comparable."""

    def __init__(self, entry: Entry, reference: torch.Tensor):
        g = torch.Generator().manual_seed(1234)
        self.lm = entry.lm
        if self.lm:
            self.target = torch.randint(0, reference.shape[-1], reference.shape[:-1], generator=g)
        else:
            self.target = torch.randn(reference.shape, generator=g)
        self.target = self.target.to(reference.device)

    def __call__(self, out) -> torch.Tensor:
        y = first_output(out).float()
        if self.lm:
            return F.cross_entropy(y.reshape(-1, y.shape[-1]), self.target.reshape(-1))
        return F.mse_loss(y, self.target)


def _autocast(device: str, dtype: torch.dtype):
    import contextlib
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def train_steps(adapted: nn.Module, args: tuple, kwargs: dict, loss: Loss, *, steps: int = STEPS, lr: float = LR,
                device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[float]:
    """`steps` AdamW steps on the LoRA parameters (train mode); returns the eval-mode loss on the same batch
    before the first step and after each step (steps + 1 values)."""
    import lora_fx

    def eval_loss() -> float:
        adapted.eval()
        with torch.no_grad(), _autocast(device, dtype):
            return loss(adapted(*args, **kwargs)).item()

    params = list(lora_fx.lora_parameters(adapted))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = [eval_loss()]
    for _ in range(steps):
        adapted.train()
        with _autocast(device, dtype):
            value = loss(adapted(*args, **kwargs))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(eval_loss())
    adapted.eval()
    return losses


@dataclass
class CaseResult:
    """Everything the matrix measures on one (model, front end) case."""

    model: str
    frontend: str
    status: str = "fail"  # "pass", "fail", "skip"
    step: str = ""  # the step that failed or skipped
    error: str = ""  # first line of the error
    frontend_used: str = ""
    sites: int | None = None  # candidate sites the match pass found
    adapted_sites: int | None = None  # sites that got a LoRA branch
    loras: int | None = None  # LoRA modules (one per weight)
    start_err: float | None = None  # |adapted - model| / scale before training (B = 0: ~0)
    dynamic_err: float | None = None  # the same at another batch / sequence size
    losses: list = field(default_factory=list)  # eval loss before training and after each step
    fold_err: float | None = None  # |folded - adapted| / scale on the example inputs
    fold_dyn_err: float | None = None  # the same at the other batch / sequence size
    lora_effect: float | None = None  # |folded - model| / scale: training changed the output
    verify_identical: bool | None = None
    verify_differences: list = field(default_factory=list)
    ort_err: float | None = None  # max |ORT - merged module| over all outputs (absolute)
    ort_ok: bool | None = None  # lora_fx.check_parity's verdict (its dtype tolerances)
    ort_provider: str = ""
    seconds: dict = field(default_factory=dict)

    @property
    def loss_first(self):
        return self.losses[0] if self.losses else None

    @property
    def loss_last(self):
        return self.losses[-1] if self.losses else None


class CaseFailure(AssertionError):
    """A check of the matrix failed (as opposed to an exception raised by lora_fx or the model)."""


class Case:
    """One (model, front end) case run step by step; each step fills `result` and raises on failure.

        case = Case(entry, "export"); case.build(); case.adapt(); case.train(); case.fold(); case.onnx(tmp)
    """

    def __init__(self, entry: Entry, frontend: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 ort_device: str = "cpu"):
        self.entry, self.frontend, self.device, self.dtype = entry, frontend, device, dtype
        self.ort_device = ort_device  # lora_fx.check_parity(device=...): "cpu", "cuda" or "auto"
        self.result = CaseResult(entry.name, frontend)
        self.fold_rtol = FOLD_RTOL[dtype]

    # -------------------------------------------------------------- step bookkeeping
    def _start(self, step: str) -> None:
        import time
        self.result.step = step
        self._t0 = time.perf_counter()

    def _end(self) -> None:
        import time
        self.result.seconds[self.result.step] = round(time.perf_counter() - self._t0, 2)

    @staticmethod
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise CaseFailure(message)

    def _rel(self, got, want) -> float:
        err, scale = max_err(got, want)
        return err / scale

    def _run(self, module, other: bool = False) -> torch.Tensor:
        args, kwargs = (self.other_args, self.other_kwargs) if other else (self.args, self.kwargs)
        with torch.no_grad(), _autocast(self.device, self.dtype):
            return first_output(module(*args, **kwargs))

    # -------------------------------------------------------------- steps
    def build(self) -> None:
        self._start("build")
        e = self.entry
        model, args, kwargs = e()
        _, other_args, other_kwargs = e(batch=OTHER_BATCH, seq=OTHER_SEQ if e.dynamic_seq else SEQ)
        self.model = model.to(self.device, self.dtype)
        self.args, self.kwargs = to_device(args, self.device, self.dtype), to_device(kwargs, self.device, self.dtype)
        self.other_args = to_device(other_args, self.device, self.dtype)
        self.other_kwargs = to_device(other_kwargs, self.device, self.dtype)
        self.before = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.reference, self.other_reference = self._run(self.model), self._run(self.model, other=True)
        self._end()

    def adapt(self, **options) -> None:
        """adapt; B = 0 so the adapted model equals the model, at the example shapes and at other ones
        (torch.export traces with Dim.AUTO: batch and sequence stay dynamic)."""
        import lora_fx
        self._start("adapt")
        r = self.result
        self.adapted = lora_fx.adapt(self.model, example_inputs=self.args, example_kwargs=self.kwargs,
                                     frontend=self.frontend, **{**self.entry.options, **options})
        self.state = lora_fx.graph(self.adapted).meta["lora_fx"]
        r.frontend_used = self.state.frontend
        r.sites = len(self.state.sites)
        r.adapted_sites = sum(d.adapted for d in self.state.decisions)
        r.loras = len(self.adapted.lora_fx)
        self.adapted.eval()
        r.start_err = self._rel(self._run(self.adapted), self.reference)
        self.check(r.start_err <= self.fold_rtol, f"adapted model (B = 0) differs from the model: {r.start_err:.2e}")
        self._end()
        self._start("dynamic")
        r.dynamic_err = self._rel(self._run(self.adapted, other=True), self.other_reference)
        self.check(r.dynamic_err <= self.fold_rtol,
                   f"adapted model at batch {OTHER_BATCH} / another sequence length differs: {r.dynamic_err:.2e}")
        self._end()

    def train(self, steps: int = STEPS, lr: float = LR) -> None:
        self._start("train")
        r = self.result
        r.losses = train_steps(self.adapted, self.args, self.kwargs, Loss(self.entry, self.reference), steps=steps,
                               lr=lr, device=self.device, dtype=self.dtype)
        self.check(all(v == v for v in r.losses), f"loss is NaN: {r.losses}")
        self.check(r.losses[-1] < r.losses[0], f"loss did not fall in {steps} steps: {r.losses}")
        changed = [k for k, v in self.model.state_dict().items() if not torch.equal(v, self.before[k])]
        self.check(not changed, f"LoRA training changed the user's model (base in train mode): {changed[:4]}")
        self._end()

    def fold(self) -> None:
        """fold (inplace=False): the graph equals the traced original, the output equals the adapted model's
        (FOLD_RTOL), the user's model is untouched, and the LoRA did change the output."""
        import lora_fx
        from lora_fx.passes.infra import first_difference, graph_signature
        self._start("fold")
        r = self.result
        self.merged = lora_fx.fold(self.adapted)
        self.check("lora_fx" not in self.merged._modules, "the folded module still holds the LoRA container")
        folded_graph = lora_fx.fold(lora_fx.graph(self.adapted))  # the graph-level fold: the graph as traced
        difference = first_difference(self.state.original_graph, graph_signature(folded_graph.graph))
        self.check(difference is None, f"folded graph differs from the traced original: {difference}")
        self.adapted.eval()
        self.merged.eval()
        self.y_adapted = self._run(self.adapted)
        self.y_merged = self._run(self.merged)
        r.fold_err = self._rel(self.y_merged, self.y_adapted)
        r.fold_dyn_err = self._rel(self._run(self.merged, other=True), self._run(self.adapted, other=True))
        r.lora_effect = self._rel(self.y_merged, self.reference)
        changed = [k for k, v in self.model.state_dict().items() if not torch.equal(v, self.before[k])]
        self.check(not changed, f"fold(inplace=False) changed the user's model: {changed[:5]}")
        self.check(r.fold_err <= self.fold_rtol,
                   f"folded model differs from the adapted one: {r.fold_err:.2e} > {self.fold_rtol:g} (relative)")
        self.check(r.fold_dyn_err <= self.fold_rtol,
                   f"folded model differs from the adapted one at another batch/seq: {r.fold_dyn_err:.2e}")
        self.check(r.lora_effect > 5 * max(r.fold_err, FOLD_RTOL[torch.float32]),
                   f"the trained LoRA changed nothing beyond rounding: |folded - model| = {r.lora_effect:.2e}, "
                   f"|folded - adapted| = {r.fold_err:.2e}")
        self._end()

    def fx_half(self) -> CaseResult:
        self.build()
        self.adapt()
        self.train()
        self.fold()
        self.result.status, self.result.step = "pass", ""
        return self.result

    def onnx(self, out_dir) -> CaseResult:
        """Export the base model and the merged one with lora_fx.export_onnx, verify_onnx them (identical
        structure), and check ONNX Runtime against the merged module with lora_fx.check_parity."""
        import pathlib

        import lora_fx
        self.result.status = "fail"
        self._start("onnx")
        r = self.result
        out_dir = pathlib.Path(out_dir)
        stem = f"{self.entry.name}-{self.frontend}"
        self.base_path, self.merged_path = out_dir / f"{stem}-base.onnx", out_dir / f"{stem}-merged.onnx"
        lora_fx.export_onnx(self.model, self.base_path, self.args, self.kwargs)
        lora_fx.export_onnx(self.merged, self.merged_path, self.args, self.kwargs)
        self._end()

        self._start("verify")
        report = lora_fx.verify_onnx(self.base_path, self.merged_path)
        r.verify_identical, r.verify_differences = bool(report.identical), list(report.differences)
        self.check(r.verify_identical, f"merged ONNX differs from the base ONNX: {r.verify_differences[:3]}")
        self._end()

        self._start("ort")
        if self.dtype == torch.float32:
            parity = lora_fx.check_parity(self.merged_path, self.merged, self.args, self.kwargs,
                                          device=self.ort_device)
        else:
            # ONNX Runtime has no bf16 kernel for most ops (and rejects bf16 Conv, BatchNorm, ... at load), and a
            # graph traced in bf16 keeps its dtype casts when cast to fp32: put the merged weights into a fresh
            # fp32 copy of the model on the CPU (no TF32 there), export that, and check ORT against it. The bf16
            # files themselves are what verify compared above.
            model32, args32, kwargs32 = self.entry()
            merged = self.merged.state_dict()
            missing = [k for k, _ in model32.named_parameters() if k not in merged]
            self.check(not missing, f"merged weights do not name the model's parameters: {missing[:4]}")
            model32.load_state_dict({k: v.float().cpu() for k, v in merged.items()}, strict=False)
            fp32_path = out_dir / f"{stem}-merged-fp32.onnx"
            lora_fx.export_onnx(model32, fp32_path, args32, kwargs32)
            parity = lora_fx.check_parity(fp32_path, model32, args32, kwargs32, device=self.ort_device)
            r.error = f"(ORT ran an fp32 export of the merged {str(self.dtype).removeprefix('torch.')} weights)"
        r.ort_err, r.ort_ok, r.ort_provider = float(parity.max_abs_err), bool(parity.ok), parity.provider
        self.check(r.ort_ok, f"ONNX Runtime differs from the merged module: max abs err {r.ort_err:.2e} "
                             f"(atol {parity.atol:g}, rtol {parity.rtol:g})")
        self._end()
        r.status, r.step = "pass", ""
        return r


def onnx_available() -> str | None:
    """None when lora_fx's ONNX half (export, verify, runtime) imports, else why not."""
    try:
        import lora_fx.onnx.export  # noqa: F401
        import lora_fx.onnx.verify  # noqa: F401
        import lora_fx.onnx.runtime  # noqa: F401
    except ImportError as e:
        return f"lora_fx ONNX half not available: {e}"
    return None
