"""Cross-entropy and fused LM head + cross-entropy for CPU: the production path off-GPU.

Semantics are those of `kernels.reference` (values and gradients, ignore_index, all-ignored = 0, label
smoothing, z-loss, NaN-safe ignored rows, non-finite logits in valid rows propagating like torch's
logsumexp); the references stay the readable definition and the tests' oracle. What differs is cost. The
reference runs about ten full-size fp32 passes over the (tokens x vocab) logits, several of them into
new buffers (masked_fill, logsumexp, gather and their backward), and F.cross_entropy still makes two
(log_softmax, and its backward's exp): at 1,024 tokens x 50,304 that is 206 MB each, allocated, faulted in
by the kernel page by page, and returned to it at free. Here:

- Rows are processed in chunks of a few MB, so every pass after the first runs in cache.
- One exp per logit: ATen's fused softmax (max, exp and sum in one kernel, row by row) writes the
  probabilities p; the log-sum-exp comes from p itself, lse = max(z) - log(max(p)) (max(p) = exp(0) / sum
  >= 1/V never underflows, so this is as accurate as logsumexp).
- The gradient is formed during the forward pass. For "mean" and "sum" the loss is a fixed linear
  combination of the rows, so dloss/dlogits is known then (Liger-Kernel does the same); the backward only
  applies the scalar grad_output. For "none" the backward recomputes it with the per-row grad_output.
- Per valid row, with eps = label_smoothing and V the vocabulary size:
      dloss/dz = p * (1 + 2 z_loss lse) - (1 - eps) * onehot(t) - eps / V
  Ignored rows get loss 0 and gradient exactly 0, whatever they hold (they are overwritten, never scaled:
  0 * NaN would be NaN).
- A valid row whose max is not finite (NaN, +inf, or all -inf) is rare and takes the reference's exact
  formula, so non-finite values propagate as in the reference (loss inf or NaN, NaN gradient where the
  reference has one).

`linear_cross_entropy` never materialises the logits: per chunk of rows it computes h_c @ W.T into one
reused chunk buffer, turns it into the gradient in place, and accumulates grad_h and grad_W with two
matmuls. The constant parts of the gradient (the one-hot target term and label smoothing's eps / V) are
applied on the small side (rows of W and h), never as another pass over the chunk. The chunk buffer is a
per-thread workspace kept between calls: allocating and freeing it every micro-batch would page-fault it
in every time (the system time this module exists to remove).

Double backward (create_graph) is not supported, as for the Triton kernels.
"""
from __future__ import annotations

import threading

import torch
from torch.autograd.function import once_differentiable

from kernels.reference import check_args

# Chunk of logits per step: small enough to stay in this CPU's cache between the passes over it, large
# enough that the matmuls producing and consuming it stay efficient (see benchmarks/peer.py).
CHUNK_BYTES = 4 << 20
LINEAR_CHUNK_BYTES = 32 << 20  # ~160 rows at vocab 50,304: flat optimum between 64 and 256 rows on a Zen 4 core
_WORKSPACE_MAX_BYTES = 64 << 20


def rows_per_chunk(vocab: int, chunk_bytes: int, n_rows: int) -> int:
    return max(1, min(n_rows, chunk_bytes // (4 * max(vocab, 1))))


_local = threading.local()


def _workspace(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """A (rows, cols) fp32 scratch tensor, reused across calls on this thread when it is not too large.
    Callers must be done with it before they call anything that could use it again."""
    if rows * cols * 4 > _WORKSPACE_MAX_BYTES or device.type != "cpu":
        return torch.empty(rows, cols, dtype=torch.float32, device=device)
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < rows * cols:
        buf = _local.buf = torch.empty(rows * cols, dtype=torch.float32)
    return buf[: rows * cols].view(rows, cols)


# ------------------------------------------------------------------------------------ per chunk


def _softmax_rows(z: torch.Tensor, out: torch.Tensor, t_safe: torch.Tensor, valid: torch.Tensor,
                  label_smoothing: float, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out <- softmax(z) (fp32; `out` may be `z`); returns (per-row loss, 0 on ignored rows; lse)."""
    m = z.amax(1)  # amax, not max(1): the max with indices is ~10x slower on CPU
    z_t = z.gather(1, t_safe[:, None]).squeeze(1)
    z_mean = z.mean(1) if label_smoothing > 0 else None
    if bool((valid & ~torch.isfinite(m)).any()):
        # The reference's formula: logsumexp shifts an infinite max by 0, so +inf gives lse = inf and a NaN
        # gradient only where exp(inf - inf) is, a row of -inf gives lse = -inf, NaN gives NaN.
        lse = torch.logsumexp(z, 1)
        torch.sub(z, lse[:, None], out=out).exp_()
    else:
        torch.softmax(z, 1, out=out)
        lse = m - out.amax(1).log()  # the largest p is exp(0) / sum, at the max
    nll = lse - z_t
    if label_smoothing > 0:
        nll = (1 - label_smoothing) * nll + label_smoothing * (lse - z_mean)
    if z_loss > 0:
        nll = nll + z_loss * lse.pow(2)
    return torch.where(valid, nll, torch.zeros_like(nll)), lse


def _to_grad_(p: torch.Tensor, t_safe: torch.Tensor, valid: torch.Tensor, lse: torch.Tensor,
              label_smoothing: float, z_loss: float, scale, uniform_term: bool) -> None:
    """In place: p <- scale * (p * (1 + 2 z_loss lse) - (1 - eps) onehot(t) [- eps / V]) on valid rows, 0 on
    ignored rows. `scale` is a float or a per-row tensor; uniform_term=False leaves out the -eps/V term
    (linear_cross_entropy applies it on the small side)."""
    rows, vocab = p.shape
    per_row = torch.is_tensor(scale)
    if z_loss > 0 or per_row:
        a = scale * (1 + 2 * z_loss * lse) if z_loss > 0 else scale
        p.mul_(a[:, None] if torch.is_tensor(a) else a)
    elif scale != 1.0:
        p.mul_(scale)
    if uniform_term and label_smoothing > 0:
        p.sub_((scale * (label_smoothing / vocab))[:, None] if per_row else scale * label_smoothing / vocab)
    idx = torch.arange(rows, device=p.device) * vocab + t_safe
    hot = scale * (1 - label_smoothing)
    hot = hot.to(p.dtype) if per_row else torch.full((rows,), hot, dtype=p.dtype, device=p.device)
    p.view(-1).index_add_(0, idx[valid], hot[valid], alpha=-1.0)
    if not bool(valid.all()):
        p.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)


def _targets(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = targets.reshape(-1)
    valid = t != ignore_index
    return t, valid, torch.where(valid, t, torch.zeros_like(t))


def _reduce(loss_rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


def _scale(reduction: str, valid: torch.Tensor) -> float:
    return 1.0 / max(int(valid.sum()), 1) if reduction == "mean" else 1.0


def _rescaled(grad: torch.Tensor, ctx, g: torch.Tensor) -> torch.Tensor:
    """The stored gradient (formed for grad_output = 1) times the scalar grad_output.

    grad_output is almost always exactly 1 (loss.backward()), and then the stored tensor is returned as it
    is. Otherwise the first backward rescales it in place (no new logits-sized buffer) and later ones
    (retain_graph) multiply out of place, so a gradient handed out earlier is never changed afterwards.
    ctx keeps a reference, so autograd never steals or mutates the returned tensor."""
    g = float(g)
    if g == ctx.applied:
        return grad
    if not ctx.backward_done:
        ctx.backward_done = True
        ctx.applied = g
        return grad.mul_(g)
    return grad * (g / ctx.applied)


# ------------------------------------------------------------------------------- masked_cross_entropy


def _ce_rows(z2: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, t_safe: torch.Tensor,
             label_smoothing: float, z_loss: float, scale, grad: torch.Tensor | None, chunk_bytes: int):
    """Per-row losses of logits z2 (N, V); with grad given, grad <- scale * dloss/dz (scale: float or (N,))."""
    n, vocab = z2.shape
    loss = torch.empty(n, dtype=torch.float32, device=z2.device)
    rows = rows_per_chunk(vocab, chunk_bytes, n)
    fp32 = z2.dtype == torch.float32
    scratch = None
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        zc = z2[r0:r1]
        if grad is not None and fp32:
            pc = grad[r0:r1]
        else:
            if scratch is None:
                scratch = _workspace(rows, vocab, z2.device)
            pc = scratch[: r1 - r0]
            if not fp32:  # statistics in fp32, like the reference
                pc.copy_(zc)
                zc = pc
        loss[r0:r1], lse = _softmax_rows(zc, pc, t_safe[r0:r1], valid[r0:r1], label_smoothing, z_loss)
        if grad is not None:
            s = scale[r0:r1] if torch.is_tensor(scale) else scale
            _to_grad_(pc, t_safe[r0:r1], valid[r0:r1], lse, label_smoothing, z_loss, s, uniform_term=True)
            if not fp32:
                grad[r0:r1].copy_(pc)
    return loss


class _MaskedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, label_smoothing, z_loss, chunk_bytes, grad_enabled):
        lead = logits.shape[:-1]
        z2 = logits.reshape(-1, logits.shape[-1])
        if z2.stride(-1) != 1:
            z2 = z2.contiguous()
        t, valid, t_safe = _targets(targets, ignore_index)
        if t.shape[0] != z2.shape[0]:
            raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits {tuple(logits.shape)}")
        eager = grad_enabled and ctx.needs_input_grad[0] and reduction != "none"
        grad = torch.empty(z2.shape, dtype=z2.dtype, device=z2.device) if eager else None
        loss = _ce_rows(z2, t, valid, t_safe, label_smoothing, z_loss, _scale(reduction, valid) if eager else None,
                        grad, chunk_bytes)
        ctx.eager, ctx.shape = eager, logits.shape
        ctx.args = (label_smoothing, z_loss, chunk_bytes)
        if eager:
            ctx.grad, ctx.applied, ctx.backward_done = grad, 1.0, False
        elif reduction == "none" and grad_enabled and ctx.needs_input_grad[0]:
            ctx.save_for_backward(z2, t, valid, t_safe)
        out = _reduce(loss, valid, reduction)
        return out.view(lead) if reduction == "none" else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.eager:
            return _rescaled(ctx.grad, ctx, grad_out).view(ctx.shape), None, None, None, None, None, None, None
        z2, t, valid, t_safe = ctx.saved_tensors
        label_smoothing, z_loss, chunk_bytes = ctx.args
        grad = torch.empty_like(z2)
        scale = grad_out.reshape(-1).float()
        _ce_rows(z2, t, valid, t_safe, label_smoothing, z_loss, scale, grad, chunk_bytes)
        return grad.view(ctx.shape), None, None, None, None, None, None, None


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, *,
                         chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """`kernels.reference.masked_cross_entropy`, fast on CPU (fp32 result, any leading shape).

    The gradient is a new tensor, never the caller's logits (they may still be needed). `chunk_bytes`
    sets the rows per chunk (tests use tiny values to cover several chunks with a ragged tail)."""
    check_args(reduction, label_smoothing, z_loss)
    return _MaskedCE.apply(logits, targets, int(ignore_index), reduction, float(label_smoothing), float(z_loss),
                           int(chunk_bytes), torch.is_grad_enabled())


# ------------------------------------------------------------------------------- linear_cross_entropy


def _linear_ce(h: torch.Tensor, weight: torch.Tensor, t_safe: torch.Tensor, valid: torch.Tensor,
               label_smoothing: float, z_loss: float, scale, need_h: bool, need_w: bool, chunk: int):
    """Per-row losses of h @ weight.T and, for need_h / need_w, scale * the gradients wrt h and weight
    (scale: a float, or a per-row tensor for reduction="none"). Returns (loss, grad_h, grad_w)."""
    n, d = h.shape
    vocab = weight.shape[0]
    fp32 = h.dtype == torch.float32
    loss = torch.empty(n, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    # fp32 accumulation across chunks whatever the dtype, rounded once at the end
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
    w32 = weight if fp32 else weight.float()
    eps = label_smoothing
    per_row = torch.is_tensor(scale)
    if eps > 0 and (need_h or need_w):
        w_colsum = w32.sum(0)  # sum over the vocabulary of W's rows: the eps / V term's grad_h
        h_scaled_sum = torch.zeros(d, dtype=torch.float32, device=h.device)  # and grad_w's
    buf = _workspace(min(chunk, n), vocab, h.device) if n else None
    with torch.autocast(h.device.type, enabled=False):
        for r0 in range(0, n, chunk):
            r1 = min(r0 + chunk, n)
            hc = h[r0:r1] if fp32 else h[r0:r1].float()
            vc, tc = valid[r0:r1], t_safe[r0:r1]
            z = buf[: r1 - r0]
            torch.mm(hc, w32.t(), out=z)
            loss[r0:r1], lse = _softmax_rows(z, z, tc, vc, eps, z_loss)
            if not (need_h or need_w):
                continue
            # z <- p * (1 + 2 z_loss lse) - (1 - eps) onehot, ignored rows 0; the row scale is applied to
            # the matmul results (alpha) or, per row, to their small operands.
            _to_grad_(z, tc, vc, lse, eps, z_loss, 1.0, uniform_term=False)
            s = scale[r0:r1] if per_row else scale
            if eps > 0:  # the eps / V term, on valid rows only
                sv = torch.where(vc, s, torch.zeros_like(s)) if per_row else vc.to(torch.float32) * s
            if need_h:
                out = grad_h[r0:r1] if fp32 else torch.empty(r1 - r0, d, dtype=torch.float32, device=h.device)
                if per_row:
                    torch.mm(z, w32, out=out)
                    out.mul_(s[:, None])
                else:
                    torch.mm(z, w32, out=out)
                    if s != 1.0:
                        out.mul_(s)
                if eps > 0:
                    out.sub_(sv[:, None] * (eps / vocab) * w_colsum[None, :])
                if not fp32:
                    grad_h[r0:r1].copy_(out)
            if need_w:
                hs = hc * s[:, None] if per_row else hc
                grad_w.addmm_(z.t(), hs, alpha=1.0 if per_row else s)
                if eps > 0:
                    h_scaled_sum.add_((hc * sv[:, None]).sum(0))
    if need_w and eps > 0:
        grad_w.sub_(h_scaled_sum[None, :] * (eps / vocab))
    if need_w and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    return loss, grad_h, grad_w


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss, chunk_size,
                grad_enabled):
        if hidden.dtype != weight.dtype:
            raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
        h = hidden.reshape(-1, hidden.shape[-1])
        t, valid, t_safe = _targets(targets, ignore_index)
        if t.shape[0] != h.shape[0]:
            raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden {tuple(hidden.shape)}")
        chunk = chunk_size or rows_per_chunk(weight.shape[0], LINEAR_CHUNK_BYTES, max(h.shape[0], 1))
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        eager = (need_h or need_w) and reduction != "none"
        scale = _scale(reduction, valid)
        loss, grad_h, grad_w = _linear_ce(h, weight, t_safe, valid, label_smoothing, z_loss, scale,
                                          eager and need_h, eager and need_w, chunk)
        ctx.eager, ctx.shape = eager, hidden.shape
        ctx.args = (label_smoothing, z_loss, chunk)
        if eager:
            ctx.grads, ctx.applied, ctx.backward_done = (grad_h, grad_w), 1.0, False
        elif need_h or need_w:
            ctx.save_for_backward(h, weight, t_safe, valid)
        out = _reduce(loss, valid, reduction)
        return out.view(targets.shape) if reduction == "none" else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.eager:
            grad_h, grad_w = ctx.grads
            # Both are small (hidden- and weight-sized): out of place, never the tensors kept in ctx.
            g = grad_out.reshape(())
            if float(g) != 1.0:
                grad_h = grad_h * g if grad_h is not None else None
                grad_w = grad_w * g if grad_w is not None else None
        else:
            h, weight, t_safe, valid = ctx.saved_tensors
            label_smoothing, z_loss, chunk = ctx.args
            scale = grad_out.reshape(-1).float()
            _, grad_h, grad_w = _linear_ce(h, weight, t_safe, valid, label_smoothing, z_loss, scale,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1], chunk)
        grad_h = grad_h.view(ctx.shape) if grad_h is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, *, chunk_size: int | None = None) -> torch.Tensor:
    """`kernels.reference.linear_cross_entropy` (masked CE of hidden @ weight.T, weight (vocab, hidden))
    without the full logits: `chunk_size` rows at a time (default: a chunk of logits of LINEAR_CHUNK_BYTES)."""
    check_args(reduction, label_smoothing, z_loss)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _LinearCE.apply(hidden, weight, targets, int(ignore_index), reduction, float(label_smoothing),
                           float(z_loss), chunk_size, torch.is_grad_enabled())


__all__ = ["CHUNK_BYTES", "LINEAR_CHUNK_BYTES", "linear_cross_entropy", "masked_cross_entropy"]
