"""LoftQ initialisation (Li et al., 2023): start a quantized weight's LoRA at its quantization error.

QLoRA starts from B = 0, so the adapted model starts at dequant(Q(W0)), not at W0, and training spends part of the
LoRA's capacity (and steps) undoing the quantization error. LoftQ sets A and B instead to the best rank-r
approximation of that error,

    s · B·A = SVD_r(W0 − dequant(Q(W0))),   B = U_r·sqrt(S_r / s),   A = sqrt(S_r / s)·V_rᵀ

so the adapted model starts as close to W0 as rank r allows. This is one alternation of LoftQ (the paper and PEFT's
default, loftq_iter=1): the base stays exactly Q(W0), so an adapter file's record rebuilds it as before. The merged
model must then be the dequantized fold: the LoRA already holds the quantization error, and adding it to W0 would
count it twice (lora_fx.quantize refuses that fold for these weights).
"""

from __future__ import annotations

import torch

# above this many elements the SVD is randomized (torch.svd_lowrank, 2r columns, 4 power iterations): a full SVD
# of a 4096 x 4096 matrix takes ~30 s on a CPU (an 8B model has 64 of them, and larger ones), the randomized one of
# 14336 x 4096 under a second; only the top r directions are needed
FULL_SVD_MAX_ELEMENTS = 1024 * 1024


def low_rank_factors(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), (r, in) and (out, r) in fp32, with scaling · B·A the best rank-r approximation of `residual`."""
    error = residual.float()
    if error.numel() <= FULL_SVD_MAX_ELEMENTS or min(error.shape) <= 2 * r:
        U, S, Vh = torch.linalg.svd(error, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[error.device] if error.is_cuda else []):
            torch.manual_seed(0)  # deterministic, and the user's random stream is left as it was
            U, S, V = torch.svd_lowrank(error, q=min(2 * r, min(error.shape)), niter=4)
        Vh = V.T
    root = (S[:r] / scaling).sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root


def rank_r_share(residual: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> float:
    """The share of the residual's squared Frobenius norm that scaling · B·A removes: 1 − |R − sBA|² / |R|²."""
    error = residual.float()
    left = error - scaling * (B @ A)
    total = float((error ** 2).sum())
    return 1.0 - float((left ** 2).sum()) / total if total > 0 else 0.0
