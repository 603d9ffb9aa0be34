"""A quantized frozen base: QLoRA's NF4 for memory, FP8 for speed, as one opt-in step after adapt.

    adapted = lora_fx.adapt(model, rules, example_inputs=...)
    report = lora_fx.quantize_base(adapted, "nf4")          # or "fp8"; which="all" for every frozen linear
    ...train (torch.compile, checkpoint_layers as before)...
    lora_fx.compare_folds(adapted, held_out)                 # optional: which fold is closer to what was trained
    merged = lora_fx.fold(adapted)                           # base="auto" | "dequantized" | "original"

What changes, and where:
  * NF4 (lora_fx.nf4): each chosen weight is replaced, in its own module, by its NF4 form (the user's model and the
    adapted model share that module); the exact W0 is copied to the CPU first (keep_original=True), for a fold
    into the original precision. The model's memory on the GPU drops to ~0.52 bytes a quantized parameter.
  * FP8 (lora_fx.fp8): the weight stays; its FP8 forms sit beside it in the adapted model (`lora_fx_base`).
  * Every graph the adapted model runs, now and captured later, reads these weights through the quantize-base pass
    (lora_fx.passes.quantize_base): each linear call becomes the quantized matmul. Direct calls of an nn.Linear
    with an NF4 weight run torchao's NF4 linear.

The LoRA was trained against the quantized weights, so fold offers both: W0 + ΔW (the original precision), or
dequant(W) + ΔW (exactly the function that was trained, rounded once). compare_folds measures both on held-out
inputs against the quantized model; fold(base="auto") takes the closer one it measured, or the dequantized fold
when nothing was measured (it is the trained function itself; the original W0 differs by the quantization error).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from lora_fx import adapted as adapted_model
from lora_fx import fp8, loftq, nf4
from lora_fx.errors import FoldError, InputError, LoraFxError
from lora_fx.lora import LoraLinear
from lora_fx.passes import quantize_base as quantize_pass
from lora_fx.passes.inject import adapter_key
from lora_fx.passes.split_layers import LayerView
from lora_fx.plan import tied_weights
from lora_fx.site import IN_OUT
from lora_fx.site_kinds import kind_of
from lora_fx.state import LoraState, adapted_state, find_state

log = logging.getLogger("lora_fx")

KINDS = ("nf4", "fp8")
FOLD_BASES = ("auto", "dequantized", "original")
LORA_COMPUTE = ("auto", "base", "adapter")
LORA_INITS = ("keep", "loftq")


class Nf4Matmul(nn.Module):
    """The quantized matmul of one NF4 weight; the weight itself stays in its module (the graph passes it).
    Called as the graph's call was (lora_fx.passes.quantize_base.call_form): (x, W, b), or for a weight stored
    (in, out) (b, x, W, form="addmm") / (x, W, form="matmul")."""

    def forward(self, *args: torch.Tensor | None, form: str = "linear") -> torch.Tensor:
        x, weight, bias = quantize_pass.operands(args, form)
        return nf4.linear(x, weight, bias, transposed=form != "linear")


class Fp8Matmul(fp8.Fp8Weight):
    """The FP8 forms of one weight and their matmul (the bf16 weight the graph passes is not read). A weight stored
    (in, out) gets the FP8 forms of its transpose; dequantize gives it back in its own layout."""

    def __init__(self, weight: torch.Tensor, stored_in_out: bool = False):
        super().__init__(weight.t().contiguous() if stored_in_out else weight)
        self.stored_in_out = stored_in_out
        self.made_from = _identity(weight)

    def follow(self, weight: torch.Tensor) -> bool:
        """Make the FP8 forms again when `weight` changed since they were made (load_state_dict writes the weight in
        place, or replaces it with assign=True); whether it did."""
        if _identity(weight) == self.made_from:
            return False
        self.remake(weight.t().contiguous() if self.stored_in_out else weight)
        self.made_from = _identity(weight)
        return True

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = super().dequantize(dtype)
        return w.t() if self.stored_in_out else w

    def forward(self, *args: torch.Tensor | None, form: str = "linear") -> torch.Tensor:
        x, _, bias = quantize_pass.operands(args, form)
        return super().forward(x, bias)


def _identity(weight: torch.Tensor) -> tuple[int, int]:
    """What changes when a weight's values may have: its storage, and its version counter (in-place writes)."""
    try:
        return weight.data_ptr(), weight._version
    except RuntimeError:  # an inference tensor has no version counter
        return weight.data_ptr(), -1


def follow_loaded_originals(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """load_state_dict pre hook of an adapted model with an NF4 base: torchao quantizes a loaded weight into the NF4
    tensor, so the kept exact W0 (fold(base="original")) must follow too: the loaded tensor itself when it is in
    full precision, none when it is NF4 already (its original is not in the state dict). compare_folds' verdict
    was measured on the old weights: it is dropped."""
    state = find_state(module)
    if state is None:
        return
    for name, record in state.quantized.items():
        value = state_dict.get(prefix + name)
        if record.kind != "nf4" or not isinstance(value, torch.Tensor):
            continue
        state.fold_choice = None
        if record.lora_init == "keep" and not nf4.is_nf4(value) and value.is_floating_point():
            record.original = value.detach().to("cpu", copy=True)
        else:
            record.original, record.original_lost = None, True


def follow_loaded_weights(module: nn.Module, incompatible_keys: Any = None) -> None:
    """load_state_dict post hook of an adapted model with an FP8 base: the FP8 forms, which are not in the state dict,
    follow the weights it loaded (NF4 weights are loaded into their NF4 tensors themselves)."""
    state = find_state(module)
    container = module._modules.get(quantize_pass.CONTAINER)
    if state is None or container is None:
        return
    for name, record in state.quantized.items():
        if record.kind == "fp8":
            container[record.key].follow(module.get_parameter(name))


@dataclass
class QuantizedWeight:
    """One quantized frozen weight."""

    kind: str  # "nf4" or "fp8"
    key: str  # its matmul in the adapted model's lora_fx_base container
    dtype: torch.dtype  # the weight's dtype at quantize_base (its LoRA's compute dtype under lora_compute="base")
    original: torch.Tensor | None  # NF4: the exact W0, on the CPU (None: keep_original=False; FP8: the weight stays)
    adapted: bool  # whether a LoRA of the model updates it
    block_size: int  # the NF4 block asked for (lora_fx.nf4.block_sizes picks the one that tiles the weight)
    lora_compute: str  # "base" or "adapter": the dtype its LoRA branches multiply in
    lora_init: str = "keep"  # "loftq": its LoRA started at the quantization error (lora_fx.loftq), so only the
    #                          dequantized fold is right
    original_lost: bool = False  # load_state_dict loaded NF4 weights, whose exact originals it does not hold


@dataclass
class QuantizeReport:
    """What quantize_base did: the weights quantized, the ones left as they were (with why), and the bytes their
    base forms take on the device before and after."""

    kind: str
    quantized: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    # lora_init="loftq": per LoRA-updated weight, the share of its quantization error (squared Frobenius norm) that
    # its LoRA's starting value removes
    error_removed: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"quantize_base({self.kind!r}): {len(self.quantized)} weights, "
                 f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB on the device"]
        if self.error_removed:
            shares = list(self.error_removed.values())
            lines.append(f"  LoftQ: the LoRAs start holding {sum(shares) / len(shares):.1%} of the quantization "
                         f"error (its squared norm; mean over {len(shares)} weights, "
                         f"{min(shares):.1%}-{max(shares):.1%})")
        lines += [f"  left as is: {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class FoldComparison:
    """compare_folds' measurement: per fold base, how far the merged model's outputs are from the quantized model
    that was trained (max abs difference, and the relative L2 norm of the difference), over the held-out inputs."""

    max_abs: dict[str, float]
    rel_l2: dict[str, float]
    closer: str
    batches: int

    def __str__(self) -> str:
        rows = [f"  {b:<12} max |diff| {self.max_abs[b]:.3e}   relative L2 {self.rel_l2[b]:.3e}" for b in self.max_abs]
        return "\n".join([f"merged vs the quantized model over {self.batches} held-out batches:", *rows,
                          f"  closer: {self.closer}"])


# ---------------------------------------------------------------------------------------------------- quantize
def quantize_base(adapted: nn.Module, kind: str = "nf4", *, which: str | Sequence[str] = "adapted",
                  keep_original: bool = True, block_size: int = 64, lora_compute: str = "auto",
                  lora_init: str = "keep") -> QuantizeReport:
    """Store the frozen base weights of `adapted` quantized and compute with them (see the module docstring).

    kind: "nf4" (4-bit NormalFloat with double quantization, bf16 compute; needs torchao: the `quant` extra) or
    "fp8" (e4m3, the forward and input-gradient matmuls on FP8 tensor cores; needs a GPU of compute capability
    8.9+, or runs a reference matmul on the CPU). which: "adapted" (the weights that have a LoRA), "all" (every
    frozen linear weight; tied weights and modules trained in full stay as they are) or a list of weight names
    (each must be quantizable: an adapter file's record of the base it was trained against). keep_original: NF4
    copies each exact W0 to the CPU first, for fold(base="original") (FP8 keeps the weight itself beside its FP8
    forms, so that fold needs no copy). block_size: NF4 block (64 as in QLoRA).
    lora_compute: the dtype the LoRA branches of quantized weights multiply in: "base" (the base weight's, e.g.
    bf16; A and B stay fp32 master weights, autocast's recipe), "adapter" (A and B's own, fp32 beside a bf16
    base, PEFT's QLoRA) or "auto": "base" for fp8 (everything but the frozen FP8 matmuls in bf16, as torchao's
    float8 training), "adapter" for nf4.
    lora_init: "keep" (the LoRAs stay as adapt made them: B = 0, so training starts from the quantized model, as in
    QLoRA) or "loftq" (LoftQ: each LoRA of a quantized weight starts at the best rank-r approximation of its
    quantization error, so the model starts closer to the original; lora_fx.loftq). LoftQ needs untrained LoRAs,
    one adapter per weight, and fold into the dequantized weights (the original fold would count the error twice).

    Call it once, right after adapt (or loading an adapter), best before making checkpoint_layers / split_layers
    views (a view made before runs its calls through a new split of the quantized graph, and is refused once FSDP2
    sharded it) and torch.compile; it changes the base weights in place in the user's model too (NF4: that is the
    memory saving). FP8's forms follow weights that load_state_dict writes later (a pretrained checkpoint).
    On error nothing is changed."""
    owner, state = adapted_state(adapted, what="quantize the base of")
    if isinstance(adapted, LayerView) or isinstance(owner, torch.fx.GraphModule):
        raise InputError("quantize_base takes the adapted model, not a graph or layer view of it",
                         where=type(adapted).__name__, fix="pass lora_fx.adapt's result")
    if kind not in KINDS:
        raise InputError(f"unknown kind {kind!r}", where="quantize_base", fix=f"use one of {KINDS}")
    if lora_compute not in LORA_COMPUTE:
        raise InputError(f"unknown lora_compute {lora_compute!r}", where="quantize_base",
                         fix=f"use one of {LORA_COMPUTE}")
    if lora_init not in LORA_INITS:
        raise InputError(f"unknown lora_init {lora_init!r}", where="quantize_base", fix=f"use one of {LORA_INITS}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 8 or \
            block_size & (block_size - 1):
        raise InputError(f"block_size must be a power of two, 8 or more, got {block_size!r}", where="quantize_base",
                         fix="leave it at 64 (QLoRA's NF4 block); smaller blocks store more scales")
    if isinstance(which, str) and which not in ("adapted", "all"):
        raise InputError(f"which must be 'adapted', 'all' or a list of weight names, got {which!r}",
                         where="quantize_base", fix="'adapted': the weights with a LoRA; 'all': every frozen linear "
                                                   "weight; a list: those weights")
    if state.quantized:
        raise InputError(f"the base is quantized already ({next(iter(state.quantized.values())).kind})",
                         where=type(owner).__name__, fix="quantize once; fold gives back a plain model")
    if state.merged:
        raise InputError(f"adapter {state.merged[-1]!r} is merged into the base weights", where="quantize_base",
                         fix="unmerge_adapter first: the LoRA must train against the quantized weights")
    names, skipped, in_out = _choose(owner, state, which, kind, block_size)
    if not isinstance(which, str):
        refused = {w: skipped.get(w, "no linear call of the model reads it") for w in which if w not in names}
        if refused:
            raise InputError(f"these weights cannot be quantized: {dict(list(refused.items())[:5])}",
                             where="quantize_base", fix=_choose_fix(refused))
    if not names:
        found = dict(list(skipped.items())[:5]) or "no weight the model reads is a linear call's"
        raise InputError(f"no weight can be quantized: {found}", where="quantize_base", fix=_choose_fix(skipped))
    adapted_weights = _lora_weights(owner, state)
    if lora_compute == "auto":
        lora_compute = "base" if kind == "fp8" else "adapter"

    # every new form is made before anything is changed: an error leaves the model as it was
    container, records, new_weights, before, after = nn.ModuleDict(), {}, {}, 0, 0
    for name in names:
        w = owner.get_parameter(name)
        key = adapter_key(name, set(container.keys()))
        before += w.numel() * w.element_size()
        if kind == "nf4":
            new_weights[name] = nn.Parameter(nf4.quantize(w, block_size), requires_grad=False)
            container[key] = Nf4Matmul()
            after += nf4.nbytes(new_weights[name])
        else:
            container[key] = Fp8Matmul(w, stored_in_out=name in in_out)
            after += w.numel() * w.element_size() + sum(b.numel() * b.element_size() for b in container[key].buffers())
        copy_original = keep_original and kind == "nf4" and lora_init == "keep"  # LoftQ: no original fold
        original = w.detach().to("cpu", copy=True) if copy_original else None
        records[name] = QuantizedWeight(kind, key, w.dtype, original, name in adapted_weights, block_size,
                                        lora_compute, lora_init)
    starts = _loftq_starts(owner, state, new_weights, container, records) if lora_init == "loftq" else {}

    set_weights(owner, new_weights)  # NF4: the weight itself is replaced, in the module that owns it
    owner.add_module(quantize_pass.CONTAINER, container)
    if kind == "fp8":
        owner.register_load_state_dict_post_hook(follow_loaded_weights)
    else:
        owner.register_load_state_dict_pre_hook(follow_loaded_originals)
    state.quantized.update(records)
    if lora_compute == "base":
        for lora in _lora_branches(owner, state):
            if isinstance(lora, LoraLinear) and lora.weight_name in records:
                lora.compute_dtype = records[lora.weight_name].dtype
    keys = {name: r.key for name, r in records.items()}
    for gm in _graphs(owner):
        quantize_pass.rewrite(gm, gm.meta["lora_fx"].sites, keys, container)
    calls = owner.__dict__[adapted_model.CALLS]
    for entries in calls.graphs.values():
        for entry in entries:
            entry.views.clear()  # split again from the rewritten graph when next wanted
    calls.base_changes += 1  # views made before route their calls to those (lora_fx.api._OtherCalls)
    with torch.no_grad():
        for lora, (A, B, _) in starts.items():
            lora.lora_A.copy_(A)
            lora.lora_B.copy_(B)
    removed = {lora.weight_name + (f" rows {list(lora.rows)}" if lora.rows else ""): share
               for lora, (_, _, share) in starts.items()}
    report = QuantizeReport(kind, list(names), skipped, before, after, removed)
    log.info("lora_fx: %s", report)
    return report


# why a weight read by another kind of site (lora_fx.site_kinds) is left as it is
_NOT_QUANTIZED = {
    "experts": "an expert weight (read by a grouped or batched matmul): quantize_base quantizes 2-D linear weights",
    "conv": "a convolution weight: quantize_base quantizes linear weights",
    "embedding": "an embedding table (a lookup, not a matmul)",
}


def _choose(owner: nn.Module, state: LoraState, which: str | Sequence[str], kind: str,
            block_size: int = 64) -> tuple[list[str], dict[str, str], set[str]]:
    """The weights to quantize, why each other candidate is left as is, and which chosen ones are stored (in, out)
    (GPT-2's Conv1D, x @ W: their quantized matmul multiplies by the weight, not its transpose)."""
    adapted_weights = _lora_weights(owner, state)
    tied = tied_weights(adapted_model.user_model(owner))
    full = state.modules_to_save
    sites_of: dict[str, list] = {}
    other_reads: dict[str, set[str]] = {}  # weights read by ops quantize_base has no matmul for: how
    every_graph = [site for gm in _graphs(owner) for site in gm.meta["lora_fx"].sites]
    for site in [*state.sites, *every_graph]:  # every read in every graph is checked before anything changes
        if site.op in ("linear_module", "functional_linear", "matmul", "conv1d"):
            sites_of.setdefault(site.weight, []).append(site)
        else:
            other_reads.setdefault(site.weight, set()).add(_NOT_QUANTIZED[kind_of(site).name])
    chosen, skipped = [], {}
    for weight in [w for w in other_reads if w not in sites_of]:
        if (which == "all" or weight in adapted_weights) if isinstance(which, str) else weight in which:
            skipped[weight] = "; ".join(sorted(other_reads[weight]))
    for weight, sites in sites_of.items():
        if (which == "adapted" and weight not in adapted_weights) or (
                not isinstance(which, str) and weight not in which):
            continue
        reasons = list(dict.fromkeys(r for r in map(quantize_pass.why_not_rewritable, sites) if r))
        reasons += sorted(other_reads.get(weight, ()))
        if len({s.weight_layout for s in sites}) > 1:
            reasons.append("read both as (out, in) and as (in, out)")
        w = owner.get_parameter(weight)
        if weight in tied:
            reasons.append(f"tied to {tied[weight]}")
        if any(weight == m or weight.startswith(m + ".") for m in full):
            reasons.append("its module is trained in full (modules_to_save)")
        if w.requires_grad:
            reasons.append("it trains")
        if not w.is_floating_point() or w.element_size() < 2:
            reasons.append(f"it is {w.dtype}")
        if kind == "fp8" and w.is_cuda and not fp8.kernel_available(w.device):
            raise InputError(f"FP8 matmuls need a GPU of compute capability 8.9 or newer; {w.device} is "
                             f"{torch.cuda.get_device_capability(w.device)}", where="quantize_base",
                             fix="use 'nf4', or run on an Ada/Hopper GPU")
        if kind == "fp8" and w.is_cuda and not fp8.fits_kernel(*w.shape):
            reasons.append(f"shape {tuple(w.shape)} is not a multiple of 16 (the FP8 kernel's tile)")
        if kind == "nf4" and nf4.block_sizes(w.numel(), block_size) is None:
            reasons.append(f"shape {tuple(w.shape)} has no NF4 block size of {block_size} or less")
        if reasons:
            skipped[weight] = "; ".join(reasons)
        else:
            chosen.append(weight)
    in_out = {w for w in chosen if sites_of[w][0].weight_layout == IN_OUT}
    return chosen, skipped, in_out


def _choose_fix(reasons: dict[str, str]) -> str:
    """How to fix a refusal, for the reasons given."""
    text = " ".join(reasons.values())
    if "NF4 block size" in text:
        return ("NF4 stores a weight in blocks of 8 to block_size values: leave weights whose size is not a multiple "
                "of 8 out (which=[...] listing the others), or use 'fp8'")
    if "expert weight" in text or "convolution" in text or "embedding" in text:
        return ("quantize_base quantizes 2-D weights read by whole-weight linear calls (nn.Linear, F.linear, x @ W.T, "
                "GPT-2's Conv1D, x @ W); expert banks, convolutions and embeddings stay as they are: adapt linear "
                "layers too, or which='all' to quantize every frozen linear weight")
    return ("list only weights that whole-weight linear calls read (nn.Linear, F.linear, x @ W.T, GPT-2's Conv1D, "
            "x @ W), frozen and untied; lora_fx.plan lists how each weight is read")


def _loftq_starts(owner: nn.Module, state: LoraState, new_weights: dict[str, nn.Parameter],
                  container: nn.ModuleDict, records: dict[str, QuantizedWeight]) -> dict[nn.Module, tuple]:
    """{LoRA branch: (A, B, share of the error removed)} for LoftQ: each LoRA of a quantized weight starts at the
    rank-r approximation of W0 − dequant(Q(W0)) (its rows of it, for a slice of a packed weight)."""
    adapters_of: dict[str, set[str]] = {}
    branches = []
    for adapter, modules in state.containers(owner).items():
        for lora in modules.values():
            if lora.weight_name in records:
                adapters_of.setdefault(lora.weight_name, set()).add(adapter)
                branches.append(lora)
    if not branches:
        raise InputError("lora_init='loftq' found no LoRA on the weights it quantizes", where="quantize_base",
                         fix="quantize the adapted weights (which='adapted'), or use lora_init='keep'")
    shared = {w: sorted(a) for w, a in adapters_of.items() if len(a) > 1}
    if shared:
        raise InputError(f"LoftQ gives one LoRA a weight's quantization error, and several adapters update "
                         f"{dict(list(shared.items())[:3])}", where="quantize_base",
                         fix="use lora_init='keep' for models with several adapters on a weight")
    for lora in branches:
        if not isinstance(lora, LoraLinear):
            raise InputError(f"LoftQ needs a linear LoRA, {lora.weight_name} has a {type(lora).__name__}",
                             where=lora.weight_name, fix="use lora_init='keep'")
        if bool(lora.lora_B.detach().ne(0).any()):
            raise InputError("lora_init='loftq' replaces A and B, and this LoRA has trained (or was loaded): B is "
                             "not zero", where=lora.weight_name,
                             fix="call quantize_base(..., lora_init='loftq') right after adapt, before training")
    starts = {}
    for lora in branches:
        name = lora.weight_name
        w = owner.get_parameter(name)
        with torch.no_grad():
            if records[name].kind == "nf4":
                dequantized = nf4.dequantize(new_weights[name], torch.float32)
            else:
                dequantized = container[records[name].key].dequantize(torch.float32)
            error = w.detach().float() - dequantized
            if lora.weight_layout == IN_OUT:  # the LoRA's B·A is (out, in)
                error = error.t()
            if lora.row_index is not None:
                error = error.index_select(0, lora.row_index.to(error.device))
            A, B = loftq.low_rank_factors(error, lora.r, lora.scaling)
            share = loftq.rank_r_share(error, A, B, lora.scaling)
        starts[lora] = (A.to(lora.lora_A.dtype), B.to(lora.lora_B.dtype), share)
    return starts


def _lora_branches(owner: nn.Module, state: LoraState) -> list[nn.Module]:
    """Every adapter's LoRA branch modules."""
    return [lora for c in state.containers(owner).values() for lora in c.values()]


def _lora_weights(owner: nn.Module, state: LoraState) -> set[str]:
    """The weights some adapter's LoRA updates."""
    return {lora.weight_name for lora in _lora_branches(owner, state)}


def set_weights(owner: nn.Module, weights: dict[str, nn.Parameter], *, in_user_model: bool = True) -> None:
    """Replace weights in the modules that own them (shared by the user's model, the adapted model, its clones), and
    in every captured graph: torch.fx gives a parameter read outside a leaf module (F.linear(x, self.w), x @ W.T)
    its own holder module in the GraphModule. in_user_model=False leaves the user's model as it is (weights the
    adapted model holds its own copies of: modules trained in full)."""
    roots = [owner, *([adapted_model.user_model(owner)] if in_user_model else []), *_graphs(owner)]
    for root in {id(m): m for m in roots}.values():
        for name, value in weights.items():
            _replace_parameter(root, name, value)


def _replace_parameter(root: nn.Module, name: str, value: nn.Parameter) -> None:
    """root's parameter `name` becomes `value`, where root has it (a graph may not read every weight)."""
    path, _, leaf = name.rpartition(".")
    try:
        module = root.get_submodule(path) if path else root
    except AttributeError:
        return
    if leaf in module._parameters:
        module._parameters[leaf] = value


def _graphs(owner: nn.Module) -> list:
    calls = owner.__dict__[adapted_model.CALLS]
    return list({id(e.graph): e.graph for entries in calls.graphs.values() for e in entries}.values())


# ---------------------------------------------------------------------------------------------------- adapter files
def adapter_record(state: LoraState) -> dict | None:
    """What an adapter file keeps of the quantized base its LoRA was trained against (None: a plain base): enough
    for lora_fx.adapt_from_adapter to quantize the same weights of the original model the same way (both
    quantizations are deterministic), so the fold deploys exactly what was trained, in another process."""
    if not state.quantized:
        return None
    first = next(iter(state.quantized.values()))
    return {"kind": first.kind, "block_size": first.block_size, "lora_compute": first.lora_compute,
            "lora_init": first.lora_init, "weights": sorted(state.quantized), "fold": state.fold_choice}


def record_problems(record: Any) -> list[str]:
    """Why an adapter file's quantized-base record is malformed (empty: it is well formed). The file is input."""
    if not isinstance(record, dict):
        return [f"quantized_base={record!r} is not an object"]
    problems = []
    if record.get("kind") not in KINDS:
        problems.append(f"quantized_base.kind={record.get('kind')!r} is not one of {KINDS}")
    size = record.get("block_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 8 or size & (size - 1):
        problems.append(f"quantized_base.block_size={size!r} is not a power of two of 8 or more")
    if record.get("lora_compute") not in ("base", "adapter"):
        problems.append(f"quantized_base.lora_compute={record.get('lora_compute')!r} is not 'base' or 'adapter'")
    weights = record.get("weights")
    if not (isinstance(weights, list) and weights and all(isinstance(w, str) and w for w in weights)):
        problems.append(f"quantized_base.weights={weights!r} is not a non-empty list of weight names")
    if record.get("fold") not in (None, "dequantized", "original"):
        problems.append(f"quantized_base.fold={record.get('fold')!r} is not 'dequantized', 'original' or null")
    if record.get("lora_init", "keep") not in LORA_INITS:  # files written before LoftQ have no lora_init
        problems.append(f"quantized_base.lora_init={record.get('lora_init')!r} is not one of {LORA_INITS}")
    elif record.get("lora_init") == "loftq" and record.get("fold") == "original":
        problems.append("quantized_base.fold='original' with lora_init='loftq': a LoftQ LoRA folds into the "
                        "dequantized weights only")
    return problems


def mark_loftq(state: LoraState, record: dict | None) -> None:
    """A LoRA loaded from a file trained with lora_init='loftq' holds its weights' quantization error: mark those
    weights of this quantized base as such, so fold refuses to add the error to the original W0 again."""
    if record and record.get("lora_init") == "loftq":
        for name in record["weights"]:
            if name in state.quantized:
                state.quantized[name].lora_init = "loftq"


def reproduce(adapted: nn.Module, record: dict) -> QuantizeReport:
    """Quantize `adapted`'s base as an adapter file's record says (record_problems(record) must be empty), and
    take the fold it records as fold(base="auto")'s choice. The LoRA loaded from the file is not initialised again
    (a LoftQ record only marks the weights as such: their LoRA holds the quantization error)."""
    report = quantize_base(adapted, record["kind"], which=record["weights"], block_size=record["block_size"],
                           lora_compute=record["lora_compute"], keep_original=record.get("lora_init") != "loftq")
    state = adapted_state(adapted)[1]
    mark_loftq(state, record)
    state.fold_choice = record["fold"]
    return report


# ---------------------------------------------------------------------------------------------------- capture
def finish_graph(gm: torch.fx.GraphModule, owner: nn.Module, state: LoraState, sites: list) -> None:
    """The quantize-base pass on a graph captured after quantize_base (adapt's pipeline calls it). The graph was
    traced with stand-ins of NF4 weights (`traceable`): where it holds a weight itself (torch.fx's holder modules),
    it gets the quantized one."""
    if state.quantized:
        for name in state.quantized:
            _replace_parameter(gm, name, owner.get_parameter(name))
        keys = {name: r.key for name, r in state.quantized.items()}
        quantize_pass.rewrite(gm, sites, keys, getattr(owner, quantize_pass.CONTAINER))


@contextlib.contextmanager
def traceable(owner: nn.Module, state: LoraState) -> Iterator[None]:
    """Plain stand-ins for NF4 weights while a call is traced: torch.export cannot trace into an NF4 tensor, and the
    graph only needs the weight's shape, dtype and device (the quantize-base pass routes it afterwards). The
    stand-in is a zero broadcast to the weight's shape: no memory."""
    nf4_weights = {name: owner.get_parameter(name) for name, r in state.quantized.items() if r.kind == "nf4"}
    set_weights(owner, {name: nn.Parameter(torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape),
                                            requires_grad=False) for name, w in nf4_weights.items()})
    try:
        yield
    finally:
        set_weights(owner, nf4_weights)


# ---------------------------------------------------------------------------------------------------- fold
def fold_base(state: LoraState, base: str) -> str:
    """The fold base `base` resolves to for this model ("auto": compare_folds' verdict, else "dequantized")."""
    if base not in FOLD_BASES:
        raise InputError(f"unknown fold base {base!r}", where="fold", fix=f"use one of {FOLD_BASES}")
    if base == "auto":
        return state.fold_choice or "dequantized"
    loftq_weights = [name for name, r in state.quantized.items() if r.lora_init == "loftq"]
    if base == "original" and loftq_weights:
        raise FoldError(f"the LoRAs of {loftq_weights[:3]} started at their quantization error (lora_init='loftq'): "
                        f"folded into the original W0 they would add it twice", where="fold",
                        fix="fold with base='dequantized' (what base='auto' takes): it is the model that was trained")
    if base == "original" and not all(map(_has_original, state.quantized.values())):
        lost = [name for name, r in state.quantized.items() if r.original_lost]
        raise FoldError(f"the original weights of {lost[:3]} are not at hand: load_state_dict loaded them quantized "
                        f"(NF4), without their originals" if lost else
                        "the original weights were not kept (quantize_base(..., keep_original=False))",
                        where="fold", fix="fold with base='dequantized'" + (
                            ", or load a state dict that holds the full-precision weights" if lost else ""))
    return base


def _has_original(record: QuantizedWeight) -> bool:
    """Whether the original fold can be made: the exact W0 is at hand (FP8 leaves the weight itself in place; NF4
    replaced it, kept on the CPU) and the LoRA does not hold the quantization error (LoftQ)."""
    return record.lora_init == "keep" and (record.kind == "fp8" or record.original is not None)


def base_weight(owner: nn.Module, state: LoraState, name: str, base: str) -> torch.Tensor:
    """The W0 a fold adds the LoRA to: the weight itself, or for a quantized one its original or dequantized form
    (in its own dtype, on the device the weight is on)."""
    record = state.quantized.get(name)
    w = owner.get_parameter(name)
    if record is None:
        return w
    # w.dtype, not the dtype at quantize_base: the model may have been cast since (.to(torch.bfloat16))
    if base == "original":
        return w if record.kind == "fp8" else record.original.to(w.device, w.dtype)
    if record.kind == "nf4":
        return nf4.dequantize(w, w.dtype)
    return getattr(owner, quantize_pass.CONTAINER)[record.key].dequantize(w.dtype)


def compare_folds(adapted: nn.Module, inputs: Iterable[Any]) -> FoldComparison:
    """Fold both ways and measure, on held-out `inputs` (each a tensor, a tuple of arguments or a dict of keyword
    arguments), how far each merged model's outputs are from the quantized adapted model's, in eval mode and without
    gradients. The closer fold becomes what fold(base="auto") uses for this model."""
    from lora_fx.api import fold
    from lora_fx.passes.trace import flatten_outputs

    owner, state = adapted_state(adapted, what="compare the folds of")
    if not state.quantized:
        raise InputError("the base is not quantized: both folds are the same", where=type(owner).__name__,
                         fix="call lora_fx.quantize_base(adapted, ...) before training, or just fold")
    batches = [b if isinstance(b, (tuple, dict)) else (b,) for b in inputs]
    if not batches:
        raise InputError("no held-out inputs were given", where="compare_folds",
                         fix="pass a list of batches (tensors, argument tuples or keyword dicts)")
    bases = ["dequantized"] + (["original"] if all(map(_has_original, state.quantized.values())) else [])

    def outputs(model: nn.Module) -> list[list[torch.Tensor]]:
        was = model.training
        model.eval()
        with torch.no_grad():
            out = [[t.float() for t in flatten_outputs(model(**b) if isinstance(b, dict) else model(*b))]
                   for b in batches]
        model.train(was)
        return out

    try:
        reference = outputs(owner)
    except LoraFxError:
        raise
    except Exception as err:  # the model's own error on a batch it does not take
        raise InputError(f"the adapted model failed on the held-out inputs: {type(err).__name__}: {err}",
                         where="compare_folds", fix="pass batches the model takes (each a tensor, a tuple of "
                                                    "arguments or a dict of keyword arguments)") from err
    max_abs, rel = {}, {}
    for base in bases:
        merged = fold(owner, base=base)
        got = outputs(merged)
        diffs = [(g - r) for gs, rs in zip(got, reference) for g, r in zip(gs, rs)]
        refs = [r for rs in reference for r in rs]
        max_abs[base] = max(float(d.abs().max()) for d in diffs)
        rel[base] = float(torch.sqrt(sum((d ** 2).sum() for d in diffs) / sum((r ** 2).sum() for r in refs)))
        del merged
    closer = min(bases, key=lambda b: rel[b])
    state.fold_choice = closer
    return FoldComparison(max_abs, rel, closer, len(batches))
