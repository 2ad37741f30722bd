"""Masked cross-entropy in Triton, forward and backward, with label smoothing and z-loss.

Semantics are those of `kernels.reference.masked_cross_entropy`. One program per row (token). The
vocabulary is streamed in BLOCK_V chunks with an online log-sum-exp (running max m and running sum
d = sum exp(z - m), rescaled whenever m grows), so a row of 50k logits never has to sit in registers
and no softmax is ever materialised: the backward recomputes p = exp(z - lse) blockwise from the
saved per-row lse.

Per valid row, with p = softmax(z), eps = label_smoothing, V = vocab size:
    loss  = (1 - eps) * (lse - z[t]) + eps * (lse - mean(z)) + z_loss * lse^2
    dloss/dz = p * (1 + 2 z_loss lse) - (1 - eps) * onehot(t) - eps / V
Rows whose target is ignore_index get loss 0 and gradient 0, and are never read.

Where the gradient goes: `masked_cross_entropy` (autograd path) writes it into a NEW tensor. The logits
belong to the caller, who may still need them (metrics, a second loss term, or another op's backward
that saved them), and an in-place write from a kernel bypasses autograd's version counter, so it would
corrupt them silently. The cost is one extra logits-sized buffer during backward, which is what eager
PyTorch pays anyway. The launchers `ce_forward(..., grad=...)` / `ce_backward(..., grad=...)` accept
grad aliasing logits (each element is read before it is overwritten by the same program);
`kernels.linear_ce` uses that on the chunk buffers it owns, where it is safe.

Non-finite inputs follow the reference: a +inf logit gives lse = +inf (torch's logsumexp shifts by 0
when the max is infinite, and so do we), a row of all -inf gives lse = -inf, NaN gives NaN. A target
outside [0, V) that is not ignore_index makes the row's loss NaN (the reference raises instead; a
kernel cannot, and reading out of bounds would be worse).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import check_args


@triton.jit
def _zero_row(grad_row, n_cols, BLOCK_V: tl.constexpr):
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(grad_row + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(grad_row.dtype.element_ty),
                 mask=cols < n_cols)


@triton.jit
def _grad_row(logits_row, grad_row, target, lse, scale, n_cols, label_smoothing, z_loss,
              HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, BLOCK_V: tl.constexpr):
    """grad_row = scale * dloss/dz for one valid row, recomputing softmax blockwise from lse."""
    # The coefficients are only formed when their term is on: multiplying an infinite lse by a zero
    # z_loss would turn the reference's inf into NaN.
    p_coef = 1.0
    if HAS_Z_LOSS:
        p_coef = 1.0 + 2.0 * z_loss * lse
    target_coef = 1.0
    if HAS_SMOOTHING:
        target_coef = 1.0 - label_smoothing
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        g = tl.exp(z - lse) * p_coef
        if HAS_SMOOTHING:
            g = g - label_smoothing / n_cols
        g = tl.where(cols == target, g - target_coef, g)
        tl.store(grad_row + cols, (g * scale).to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(LOGITS, logits_stride, TARGETS, LOSS, LSE, GRAD, grad_stride, SCALE, scale_stride,
                   n_cols, ignore_index, label_smoothing, z_loss,
                   HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 at 64k tokens x 50k vocab
    logits_row = LOGITS + row * logits_stride
    target = tl.load(TARGETS + row)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
        if COMPUTE_GRAD:
            _zero_row(GRAD + row * grad_stride, n_cols, BLOCK_V)
    else:
        m = float("-inf")  # running max
        d = 0.0            # running sum of exp(z - shift(m))
        z_sum = 0.0        # sum of the row, for label smoothing
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            z = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # Shift by the max, except when it is infinite (as torch.logsumexp does): then shift by 0 so
            # that +inf gives lse=+inf and an all -inf row gives lse=-inf instead of NaN from inf - inf.
            shift_new = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
            shift_old = tl.where(tl.abs(m) == float("inf"), 0.0, m)
            # d is exactly 0 while every logit seen so far is -inf; skip the rescale then, since
            # exp(0 - shift_new) could overflow to inf and 0 * inf is NaN.
            alpha = tl.where(m == float("-inf"), 0.0, tl.exp(shift_old - shift_new))
            d = d * alpha + tl.sum(tl.exp(z - shift_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        shift = tl.where(tl.abs(m) == float("inf"), 0.0, m)
        lse = shift + tl.log(d)

        in_range = (target >= 0) & (target < n_cols)
        z_t = tl.load(logits_row + target, mask=in_range, other=float("nan")).to(tl.float32)
        loss = lse - z_t
        if HAS_SMOOTHING:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_sum / n_cols)
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse
        tl.store(LOSS + row, loss)
        tl.store(LSE + row, lse)
        if COMPUTE_GRAD:
            # The fused path (linear_ce): the loss is linear in each row's term, so the final gradient
            # is known now up to the per-row scale (1/num_valid for a mean).
            scale = tl.load(SCALE + row * scale_stride)
            _grad_row(logits_row, GRAD + row * grad_stride, target, lse, scale, n_cols, label_smoothing,
                      z_loss, HAS_SMOOTHING, HAS_Z_LOSS, BLOCK_V)


@triton.jit
def _ce_bwd_kernel(LOGITS, logits_stride, TARGETS, LSE, GRAD, grad_stride, SCALE, scale_stride,
                   n_cols, ignore_index, label_smoothing, z_loss,
                   HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row)
    if target == ignore_index:
        _zero_row(GRAD + row * grad_stride, n_cols, BLOCK_V)
    else:
        lse = tl.load(LSE + row)
        scale = tl.load(SCALE + row * scale_stride)
        _grad_row(LOGITS + row * logits_stride, GRAD + row * grad_stride, target, lse, scale, n_cols,
                  label_smoothing, z_loss, HAS_SMOOTHING, HAS_Z_LOSS, BLOCK_V)


def _settings(n_cols: int, block_v: int | None) -> tuple[int, int]:
    """(BLOCK_V, num_warps). Each program streams its row twice at most (forward, gradient); 4k-wide
    blocks keep 16 fp32 values per thread at 8 warps and make 50,304 a 13-step loop."""
    if block_v is None:
        block_v = max(16, min(triton.next_power_of_2(n_cols), 4096))
    return block_v, (4 if block_v <= 1024 else 8)


def _check_2d(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("the launchers take 2-D logits with unit stride along the vocabulary")
    if targets.shape != logits.shape[:1] or (targets.numel() > 1 and targets.stride(0) != 1):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits {tuple(logits.shape)}")


def ce_forward(logits, targets, loss, lse, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
               grad=None, scale=None, block_v=None):
    """Per-row loss and lse into `loss`/`lse` (fp32, (M,)). With `grad` (same shape as logits, may BE
    logits) also writes scale[row] * dloss/dlogits, `scale` an fp32 tensor of 1 or M elements."""
    _check_2d(logits, targets)
    m, n_cols = logits.shape
    if m == 0:
        return
    bv, warps = _settings(n_cols, block_v)
    compute_grad = grad is not None
    if compute_grad and (grad.shape != logits.shape or grad.stride(1) != 1):
        raise ValueError("grad must have the logits' shape and unit stride along the vocabulary")
    # Unused pointers still need a valid tensor; COMPUTE_GRAD=False compiles their uses away.
    g = grad if compute_grad else logits
    s = scale if compute_grad else lse
    _ce_fwd_kernel[(m,)](
        logits, logits.stride(0), targets, loss, lse, g, g.stride(0), s, 1 if s.numel() > 1 else 0,
        n_cols, ignore_index, float(label_smoothing), float(z_loss),
        HAS_SMOOTHING=label_smoothing > 0, HAS_Z_LOSS=z_loss > 0, COMPUTE_GRAD=compute_grad,
        BLOCK_V=bv, num_warps=warps)


def ce_backward(logits, targets, lse, scale, grad, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                block_v=None):
    """grad = scale[row] * dloss/dlogits from the saved lse; `grad` may be `logits` itself."""
    _check_2d(logits, targets)
    m, n_cols = logits.shape
    if m == 0:
        return
    bv, warps = _settings(n_cols, block_v)
    _ce_bwd_kernel[(m,)](
        logits, logits.stride(0), targets, lse, grad, grad.stride(0), scale, 1 if scale.numel() > 1 else 0,
        n_cols, ignore_index, float(label_smoothing), float(z_loss),
        HAS_SMOOTHING=label_smoothing > 0, HAS_Z_LOSS=z_loss > 0, BLOCK_V=bv, num_warps=warps)


def reduce_loss(loss_rows: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """mean over valid rows (0, never NaN, when none is valid), sum, or the rows themselves."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if reduction == "sum" else total / n_valid.clamp(min=1)


class _MaskedCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, label_smoothing, z_loss, block_v):
        lead = logits.shape[:-1]
        z = logits.reshape(-1, logits.shape[-1])
        if z.stride(-1) != 1:
            z = z.contiguous()
        t = targets.reshape(-1).contiguous()
        if t.shape[0] != z.shape[0]:
            raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits {tuple(logits.shape)}")
        loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
        lse = torch.empty_like(loss)
        ce_forward(z, t, loss, lse, ignore_index, label_smoothing, z_loss, block_v=block_v)
        n_valid = (t != ignore_index).sum()
        ctx.save_for_backward(z, t, lse, n_valid)
        ctx.args = (ignore_index, reduction, label_smoothing, z_loss, block_v, logits.shape)
        out = reduce_loss(loss, n_valid, reduction)
        return out.view(lead) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_out):
        z, t, lse, n_valid = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, z_loss, block_v, shape = ctx.args
        g = grad_out.float()
        if reduction == "mean":
            scale = (g / n_valid.clamp(min=1)).reshape(1)
        elif reduction == "sum":
            scale = g.reshape(1)
        else:
            scale = g.reshape(-1).contiguous()
        grad = torch.empty_like(z)  # a new buffer, never the caller's logits: see the module docstring
        ce_backward(z, t, lse, scale, grad, ignore_index, label_smoothing, z_loss, block_v=block_v)
        return grad.view(shape), None, None, None, None, None, None


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, *,
                         block_v: int | None = None) -> torch.Tensor:
    """Triton version of `kernels.reference.masked_cross_entropy` (fp32 result, any leading shape).

    `block_v` overrides the vocabulary block width (a power of two); tests use small values to run the
    online log-sum-exp over several blocks with a ragged tail.
    """
    check_args(reduction, label_smoothing, z_loss)
    return _MaskedCEFunction.apply(logits, targets, int(ignore_index), reduction, float(label_smoothing),
                                   float(z_loss), block_v)


__all__ = ["ce_backward", "ce_forward", "check_args", "masked_cross_entropy", "reduce_loss"]
