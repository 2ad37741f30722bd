"""Plain-PyTorch references for every kernel, with the kernels' signatures.

They define the semantics the Triton kernels and kernels.cpu must reproduce (values and gradients), and
they are what runs with backend="torch"; off-GPU, backend="auto" runs rmsnorm from here and the
cross-entropies from kernels.cpu (same semantics, fast). Statistics are taken in fp32 whatever the input
dtype, as the kernels do.
"""
from __future__ import annotations

import torch


REDUCTIONS = ("mean", "sum", "none")


def check_args(reduction: str, label_smoothing: float, z_loss: float) -> None:
    """The cross-entropy arguments every implementation (reference, CPU, Triton) accepts."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected 'mean', 'sum' or 'none'")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32, result in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the last dim; rows whose target is ignore_index contribute nothing.

    "mean" divides by the number of valid rows (0 when none is valid, never NaN); "none" returns a
    per-row loss (0 on ignored rows) with the leading shape of `logits`. `z_loss` adds
    z_loss * logsumexp^2 per valid row (PaLM's auxiliary loss).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected 'mean', 'sum' or 'none'")
    lead = logits.shape[:-1]
    z = logits.reshape(-1, logits.shape[-1]).float()
    t = targets.reshape(-1)
    valid = t != ignore_index
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    # Ignored rows (padding) may hold garbage: zero them before any op whose backward reads them, or a
    # NaN there would leak into the gradient (0 * NaN) even though the row's loss is masked out.
    z = z.masked_fill(~valid[:, None], 0.0)
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(1, safe_t[:, None]).squeeze(1)
    if label_smoothing > 0:
        smooth = lse - z.mean(-1)
        nll = (1 - label_smoothing) * nll + label_smoothing * smooth
    if z_loss > 0:
        nll = nll + z_loss * lse.pow(2)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    if reduction == "none":
        return nll.reshape(lead)
    total = nll.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0) -> torch.Tensor:
    """masked_cross_entropy(hidden @ weight.T, targets): the LM head and its loss, unfused."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    loss = masked_cross_entropy(logits, targets.reshape(-1), ignore_index, reduction, label_smoothing, z_loss)
    return loss.reshape(targets.shape) if reduction == "none" else loss


__all__ = ["linear_cross_entropy", "masked_cross_entropy", "rmsnorm"]
