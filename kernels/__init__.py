"""metalm's Triton kernels, each beside a plain-PyTorch reference with the same signature.

`backend="auto"` runs the Triton kernel on CUDA tensors, and on CPU tensors the cross-entropies of
`kernels.cpu` (plain PyTorch too, same semantics, built for speed: no full-size logits copies, the gradient
formed in the forward, a chunked fused LM head) and the rmsnorm reference; "triton" forces the kernel (on
CPU only under TRITON_INTERPRET=1, which must be set before this package's Triton modules are imported);
"torch" forces the reference. Triton modules are imported lazily, on first use.
"""
from __future__ import annotations

import importlib
import os
import sys
import types

import torch

from kernels import cpu, reference

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on CPU)")
        return True
    return t.is_cuda and triton_available()


def _use_cpu(backend: str, t: torch.Tensor) -> bool:
    return backend == "auto" and t.device.type == "cpu"


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    if _use_triton(backend, x):
        return importlib.import_module("kernels.rmsnorm").rmsnorm(x, weight, eps)
    return reference.rmsnorm(x, weight, eps)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, *,
                         backend: str = "auto") -> torch.Tensor:
    if _use_triton(backend, logits):
        mod = importlib.import_module("kernels.masked_ce")
        return mod.masked_cross_entropy(logits, targets, ignore_index, reduction, label_smoothing, z_loss)
    if _use_cpu(backend, logits):
        return cpu.masked_cross_entropy(logits, targets, ignore_index, reduction, label_smoothing, z_loss)
    return reference.masked_cross_entropy(logits, targets, ignore_index, reduction, label_smoothing, z_loss)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, *, backend: str = "auto") -> torch.Tensor:
    if _use_triton(backend, hidden):
        mod = importlib.import_module("kernels.linear_ce")
        return mod.linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss)
    if _use_cpu(backend, hidden):
        return cpu.linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss)
    return reference.linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss)


__all__ = [
    "BACKENDS",
    "cpu",
    "linear_cross_entropy",
    "masked_cross_entropy",
    "reference",
    "rmsnorm",
    "triton_available",
]

_DISPATCHERS = ("rmsnorm", "masked_cross_entropy", "linear_cross_entropy")


class _Package(types.ModuleType):
    """Importing the submodule `kernels.rmsnorm` makes Python bind it as the package attribute `rmsnorm`,
    replacing the dispatch function of the same name: after the first Triton call, `kernels.rmsnorm(...)`
    would raise "'module' object is not callable". Refuse that one rebinding so the names stay functions;
    reach the Triton modules with importlib.import_module("kernels.rmsnorm") (sys.modules is unaffected).
    """

    def __setattr__(self, name, value):
        if name in _DISPATCHERS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
