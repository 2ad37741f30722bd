"""Device settings: a device name (auto | cpu | cuda | cuda:N | mps) checked against this machine, for the
trainer's `train.device` and the evaluator's `--device`; what cannot be used is one DeviceError saying why."""
from __future__ import annotations

import os
import re


class DeviceError(ValueError):
    """The requested device cannot be used on this machine (checked before any work starts)."""


def _no_cuda_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this PyTorch build (torch {torch.__version__}) has no CUDA support"
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
    return "torch.cuda.is_available() is False: no GPU or no working driver"


def resolve_device(spec: str, setting: str) -> str:
    """`spec` as a torch device string: auto is cuda when a CUDA device is visible, else cpu. `setting` names where
    the value came from ("train.device", "--device") in the messages; a command-line flag is shown as
    `--device cuda`, a config key as `train.device=cuda`."""
    import torch  # on first use: the modules that import this one stay light

    spec = str(spec).strip()
    where = f"{setting} {spec}" if setting.startswith("-") else f"{setting}={spec}"
    use_cpu = f"{setting} cpu" if setting.startswith("-") else f"{setting}=cpu"
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", spec)
    if m is None or (m.group(1) != "cuda" and m.group(2) is not None):
        raise DeviceError(f"{where}: not a device; expected auto, cpu, cuda or cuda:N")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{where}: no CUDA device is visible ({_no_cuda_reason()}); use {use_cpu}, or run "
                              f"where a GPU is visible")
        n = torch.cuda.device_count()
        if index is not None and int(index) >= n:
            raise DeviceError(f"{where}: only {n} CUDA device{'s are' if n != 1 else ' is'} visible "
                              f"(cuda:0 to cuda:{n - 1})")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{where}: MPS is not available on this machine; use {use_cpu}")
    return spec
