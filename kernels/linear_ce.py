"""Fused LM head + masked cross-entropy that never materialises the (tokens x vocab) logits.

Semantics are those of `kernels.reference.linear_cross_entropy` (= masked_cross_entropy(hidden @ W.T)).
Tokens are processed in chunks of C rows. Per chunk:

    logits = h_c @ W.T                       (C x V, in the hidden dtype, like the reference matmul)
    Triton CE forward: per-row loss and lse, and, in place into that same logits buffer, the gradient
        d_logits = scale * dloss/dlogits     (scale = 1/num_valid for "mean", 1 for "sum")
    grad_h[c] = d_logits @ W ;  grad_W += d_logits.T @ h_c

For "mean" and "sum" the final loss is a fixed linear combination of the row terms, so dloss/dlogits
is known during the forward pass and the backward only multiplies the stored grad_h and grad_W by the
scalar grad_output. Peak extra memory is one C x V chunk (plus grad_h, the size of hidden, and grad_W,
the size of W, both needed anyway). Writing the gradient into the logits buffer is safe here: the
buffer is private to this function and dead once its gradient has been consumed.

For reduction="none" the gradient depends on the per-row grad_output, which grad_W cannot have factored
out, so forward only computes the losses (keeping the per-row lse), and backward recomputes each chunk's
logits and runs the CE backward kernel with grad_output as the per-row scale.

grad_W for bf16/fp16 weights is accumulated across chunks in fp32 and rounded once at the end, so
chunking does not add rounding error compared with the reference's single matmul.
"""
from __future__ import annotations

import torch
import triton

from kernels.masked_ce import ce_backward, ce_forward, check_args, reduce_loss


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk so that a chunk of logits is about as large as the hidden states (as Liger-Kernel
    sizes it), but at least 512 rows so that the two matmuls per chunk stay large enough to be efficient."""
    ratio = triton.cdiv(vocab, hidden)
    chunk = triton.next_power_of_2(max(1, triton.cdiv(n_tokens, ratio)))
    return max(1, min(max(chunk, 512), n_tokens))


def _accumulate_grad_w(acc: torch.Tensor, d_logits: torch.Tensor, h: torch.Tensor) -> None:
    if acc.dtype == d_logits.dtype:
        acc.addmm_(d_logits.t(), h)
    else:  # low-precision inputs, fp32 accumulator
        acc.add_(d_logits.t() @ h)


class _LinearCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss,
                chunk_size, block_v, grad_enabled):
        if hidden.dtype != weight.dtype:
            raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
        h = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1).contiguous()
        if t.shape[0] != h.shape[0]:
            raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden {tuple(hidden.shape)}")
        n_tok, vocab = h.shape[0], weight.shape[0]
        chunk = chunk_size or default_chunk_size(n_tok, h.shape[1], vocab)
        ce_args = (ignore_index, label_smoothing, z_loss)

        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # needs_input_grad ignores torch.no_grad() (forward always runs with grad disabled), so the
        # caller's grad mode is passed in: under no_grad nothing is computed beyond the loss.
        eager = grad_enabled and (need_h or need_w) and reduction != "none"
        n_valid = (t != ignore_index).sum()
        loss = torch.empty(n_tok, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(loss)
        if eager:
            scale = (1.0 / n_valid.clamp(min=1).float()) if reduction == "mean" else torch.ones((), device=h.device)
            scale = scale.reshape(1)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None

        # Inputs are used in their own dtypes: under autocast the matmuls would otherwise change dtype
        # behind the out= buffers.
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, n_tok, chunk):
                end = min(start + chunk, n_tok)
                h_c = h[start:end]
                logits = h_c @ weight.t()
                if not eager:
                    ce_forward(logits, t[start:end], loss[start:end], lse[start:end], *ce_args, block_v=block_v)
                    continue
                ce_forward(logits, t[start:end], loss[start:end], lse[start:end], *ce_args,
                           grad=logits, scale=scale, block_v=block_v)
                if need_h:
                    torch.mm(logits, weight, out=grad_h[start:end])
                if need_w:
                    _accumulate_grad_w(grad_w, logits, h_c)
                del logits  # free the chunk before the next one is allocated

        ctx.eager = eager
        ctx.shapes = (hidden.shape, weight.dtype)
        ctx.args = (*ce_args, chunk, block_v)
        if eager:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        else:
            ctx.save_for_backward(h, weight, t, lse)
        out = reduce_loss(loss, n_valid, reduction)
        return out.view(targets.shape) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_out):
        hidden_shape = ctx.shapes[0]
        if ctx.eager:
            grad_h, grad_w = ctx.saved_tensors
            g = grad_out.reshape(())  # 0-dim fp32: multiplies in fp32 math, keeps the gradients' dtype
            grad_h = (grad_h * g).view(hidden_shape) if grad_h is not None else None
            grad_w = grad_w * g if grad_w is not None else None
            return grad_h, grad_w, None, None, None, None, None, None, None, None
        return (*_recompute_backward(ctx, grad_out), None, None, None, None, None, None, None, None)


def _recompute_backward(ctx, grad_out):
    """reduction="none": per-row grad_output, so rebuild each chunk's logits and gradient now."""
    h, weight, t, lse = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, chunk, block_v = ctx.args
    hidden_shape = ctx.shapes[0]
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    scale = grad_out.reshape(-1).float().contiguous()
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, h.shape[0], chunk):
            end = min(start + chunk, h.shape[0])
            logits = h[start:end] @ weight.t()
            ce_backward(logits, t[start:end], lse[start:end], scale[start:end], logits, ignore_index,
                        label_smoothing, z_loss, block_v=block_v)
            if need_h:
                torch.mm(logits, weight, out=grad_h[start:end])
            if need_w:
                _accumulate_grad_w(grad_w, logits, h[start:end])
            del logits
    return (grad_h.view(hidden_shape) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, *, chunk_size: int | None = None,
                         block_v: int | None = None) -> torch.Tensor:
    """Chunked version of `kernels.reference.linear_cross_entropy`; weight is (vocab, hidden).

    `chunk_size` (tokens per chunk) and `block_v` (vocabulary block of the CE kernel) override the
    heuristics; tests use small values to cover several chunks with a ragged tail.
    """
    check_args(reduction, label_smoothing, z_loss)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _LinearCEFunction.apply(hidden, weight, targets, int(ignore_index), reduction,
                                   float(label_smoothing), float(z_loss), chunk_size, block_v,
                                   torch.is_grad_enabled())


__all__ = ["default_chunk_size", "linear_cross_entropy"]
