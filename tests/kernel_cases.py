"""Inputs and comparisons shared by the kernel tests (test_kernels.py: Triton; test_kernels_cpu.py: the CPU path):
seeded random inputs and value + gradients of an implementation and its reference. The dtype-aware closeness
check (TOL, assert_close) is kernels.tolerance's, which benchmarks/gpu_check.py uses too."""
from __future__ import annotations

import functools

import torch

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
def randn(*shape, dtype=F32, scale=1.0, seed=0, device="cpu"):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device, dtype)


def make_targets(lead, vocab, ignore_index=-100, ignore_frac=0.3, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, lead, generator=gen)
    t[torch.rand(lead, generator=gen) < ignore_frac] = ignore_index
    return t.to(device)


def run_both(fn_new, fn_ref, inputs, grad_seed=0, new_kw=None, **kw):
    """Value and gradients wrt every floating input, for the implementation and the reference called with the
    same keyword arguments (plus implementation-only `new_kw`) and the same random upstream gradient (so the
    per-row scaling of reduction="none" is exercised)."""
    results = []
    for fn in (functools.partial(fn_new, **kw, **(new_kw or {})), functools.partial(fn_ref, **kw)):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = fn(*leaves)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
        grads = torch.autograd.grad(out, [x for x in leaves if x.requires_grad], g)
        results.append((out.detach(), grads))
    return results
