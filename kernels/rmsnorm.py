"""RMSNorm in Triton: y = x * rsqrt(mean(x^2) + eps) * weight, forward and backward.

Semantics are those of `kernels.reference.rmsnorm`: statistics in fp32 whatever the input dtype, the
normalised value is multiplied by the weight in fp32 and only the product is rounded to x's dtype.

Layout: the input is viewed as (M, N) rows (any leading shape). A program handles a BLOCK_M x BLOCK_N
tile, BLOCK_N = next_power_of_2(N) with a column mask, so odd hidden sizes (123, 1536, ...) work. Packing
several rows per program matters at our small hidden sizes (96, 384): one row per program would leave
most lanes of a warp idle.

Backward, with x_hat = x * rstd and g = dy * weight:
    dx = rstd * (g - x_hat * mean(g * x_hat))        (per row)
    dweight = sum over rows of dy * x_hat
dweight is a reduction over all M rows: rather than atomics (non-deterministic, and slow on a hot
N-sized vector), a fixed number of programs each stride over the rows, keep an fp32 partial sum in
registers and write it to a (num_programs, N) buffer that torch then sums over dim 0.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_fwd_kernel(X, W, Y, RSTD, x_row_stride, y_row_stride, M, N, eps,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # M * N may exceed 2^31 at 64k tokens x large hidden

    x = tl.load(X + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    # Masked columns were loaded as 0, so they add nothing to the sum; divide by the true N.
    mean_sq = tl.sum(x * x, axis=1) / N
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows64[:, None] * y_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    # rstd is saved for the backward, so it never has to re-reduce x.
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rmsnorm_bwd_kernel(X, W, DY, DX, RSTD, DW_PARTIAL, x_row_stride, dy_row_stride, dx_row_stride, M, N,
                        rows_per_step, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    # Grid-stride loop over tiles of BLOCK_M rows: program p handles tiles p, p + P, p + 2P, ...
    for start in range(pid * BLOCK_M, M, rows_per_step):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        # Masked entries are 0 in both g and x_hat, so the row mean over the true N is exact.
        c = tl.sum(g * x_hat, axis=1) / N
        dx = rstd[:, None] * (g - x_hat * c[:, None])
        tl.store(DX + rows64[:, None] * dx_row_stride + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * x_hat, axis=0)

    tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=col_mask)


def _launch_settings(n: int, block_m: int | None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): aim for tiles of ~4k elements so small hidden sizes still fill a
    program; for N >= 4096 a program holds one row."""
    block_n = triton.next_power_of_2(n)
    if block_m is None:
        block_m = max(1, min(16, 4096 // block_n))
    tile = block_m * block_n
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    return block_m, block_n, num_warps


def _num_dw_programs(x: torch.Tensor, n_tiles: int) -> int:
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(n_tiles, 4 * sms))
    return max(1, min(n_tiles, 4))  # interpreter: few programs, each still runs the strided loop


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, block_m, num_programs):
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
        shape = x.shape
        n = shape[-1]
        # reshape keeps a view when it can; the kernel only needs unit stride along the hidden dim.
        x2 = x.reshape(-1, n)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        w = weight.contiguous()
        m = x2.shape[0]
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        bm, bn, warps = _launch_settings(n, block_m)
        if m > 0:
            _rmsnorm_fwd_kernel[(triton.cdiv(m, bm),)](
                x2, w, y, rstd, x2.stride(0), y.stride(0), m, n, eps,
                BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.settings = (bm, bn, warps, num_programs)
        ctx.shape = shape
        ctx.weight_dtype = weight.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        bm, bn, warps, num_programs = ctx.settings
        m, n = x2.shape
        dy2 = dy.reshape(-1, n)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
        n_tiles = triton.cdiv(m, bm)
        p = num_programs or _num_dw_programs(x2, n_tiles)
        dw_partial = torch.zeros((p, n), dtype=torch.float32, device=x2.device)
        if m > 0:
            _rmsnorm_bwd_kernel[(p,)](
                x2, w, dy2, dx, rstd, dw_partial, x2.stride(0), dy2.stride(0), dx.stride(0), m, n,
                p * bm, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
        dw = dw_partial.sum(0).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None, None, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
            block_m: int | None = None, num_programs: int | None = None) -> torch.Tensor:
    """Triton RMSNorm with the signature of `kernels.reference.rmsnorm`.

    `block_m` (rows per tile) and `num_programs` (programs in the dweight reduction) override the launch
    heuristics; tests use them to force the multi-tile, multi-program paths on tiny inputs.
    """
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative number, got {eps}")
    return _RMSNormFunction.apply(x, weight, float(eps), block_m, num_programs)


__all__ = ["rmsnorm"]
