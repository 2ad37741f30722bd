"""Before any work: the run directory is ours (an exclusive lock), writable, has room for checkpoints, and one
step fits in memory. Each check fails with a TrainingError naming the path or key and what to change."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from metalm.locks import HeldLock, LockBusy
from metalm.train.errors import TrainingError, describe_error

_CKPT_OVERHEAD = 1 << 20  # config, tokenizer, trainer and per-rank state, pickling overhead


def checkpoint_bytes(n_params: int, precision: str, zero_stage: int) -> int:
    """An estimate of one checkpoint's size on disk, for `n_params` trained parameters (meta head included):
    the DeepSpeed module state (2 or 4 bytes per parameter), the optimizer state (AdamW's two fp32 moments,
    plus the fp32 master copy that ZeRO 1-3 and 16-bit training keep) and the consolidated fp32 safetensors
    the evaluator reads."""
    module = 4 if precision == "fp32" else 2
    optimizer = 8 if precision == "fp32" and zero_stage == 0 else 12
    return n_params * (module + optimizer + 4) + _CKPT_OVERHEAD


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes (for an unprivileged writer) on the filesystem that holds, or will hold, `path`."""
    return shutil.disk_usage(_existing_ancestor(path)).free


def probe_writable(directory: Path, tag: str) -> None:
    """Create `directory`, then write, fsync and remove a small file in it; OSError when that fails."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".metalm-probe-{tag}-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"metalm write probe\n" * 64)
            f.flush()
            os.fsync(f.fileno())
    finally:
        try:
            probe.unlink()
        except FileNotFoundError:
            pass


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def probe_dirs(run_dir: Path, ckpt_root: Path, tag: str) -> None:
    """The run directory and the checkpoint directory take writes: TrainingError naming the directory and the
    errno otherwise (a read-only or full filesystem, a path through a file, no permission)."""
    for key, d in (("train.run_dir", run_dir), ("checkpoint directory", ckpt_root)):
        try:
            probe_writable(d, tag)
        except OSError as e:
            raise TrainingError(f"{key} {d}: cannot write there ({describe_error(e)}); make it writable or "
                                f"choose another train.run_dir") from None


def check_free_space(ckpt_root: Path, need_bytes: int, keep_last_k: int) -> list[str]:
    """TrainingError when the checkpoint directory's filesystem cannot hold one checkpoint of about
    `need_bytes`; a warning (returned) when it holds fewer than keep_last_k + 1 (the disk fills up mid-run)."""
    free = free_bytes(ckpt_root)
    if free < need_bytes:
        raise TrainingError(f"not enough free space for a checkpoint in {ckpt_root}: {_gib(free)} free, one "
                            f"checkpoint needs about {_gib(need_bytes)}; free some space, move train.run_dir, "
                            f"or set checkpoint.check_free_space=false if the filesystem misreports")
    want = need_bytes * (keep_last_k + 1)
    if free < want:
        return [f"{ckpt_root}: {_gib(free)} free holds fewer than checkpoint.keep_last_k + 1 = {keep_last_k + 1} "
                f"checkpoints of about {_gib(need_bytes)}; saves will fail once the disk is full"]
    return []



# ------------------------------------------------------------------------------------------------ memory


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def step_memory_bytes(n_params: int, *, d_model: int, n_layers: int, ffn_hidden: int, vocab_size: int,
                      micro_batch: int, seq_len: int, precision: str, zero_stage: int, world_size: int,
                      fused_linear_ce: bool) -> dict[str, int]:
    """A rough estimate of one rank's peak memory in a training step, by part (bytes).

    parameters and gradients in the training precision (fp32 masters too for 16-bit training), AdamW's two fp32
    moments (partitioned over the ranks from ZeRO-1, gradients from ZeRO-2, parameters at ZeRO-3), the
    activations autograd keeps (about 16 d + 4 ffn values per token and layer) and the LM head's logits with
    their gradient and the cross-entropy's softmax (three fp32 copies of tokens x vocabulary; one chunk's worth
    with model.fused_linear_ce)."""
    width = 4 if precision == "fp32" else 2
    shard = max(1, world_size)
    params = n_params * width / (shard if zero_stage >= 3 else 1)
    grads = n_params * width / (shard if zero_stage >= 2 else 1)
    masters = 0 if precision == "fp32" else n_params * 4 / (shard if zero_stage >= 1 else 1)
    moments = n_params * 8 / (shard if zero_stage >= 1 else 1)
    tokens = micro_batch * seq_len
    activations = tokens * n_layers * (16 * d_model + 4 * ffn_hidden) * width
    logit_rows = min(tokens, 4096) if fused_linear_ce else tokens
    logits = 3 * logit_rows * vocab_size * 4
    parts = {"parameters": params, "gradients": grads, "optimizer": masters + moments, "activations": activations,
             "logits": logits}
    return {k: int(v) for k, v in parts.items()}


def check_step_memory(parts: dict[str, int], device_type: str, accum: int) -> list[str]:
    """TrainingError when the estimated step does not fit in the memory available to this rank (host memory on
    CPU, free device memory on CUDA); returns warnings (an absurd accumulation count)."""
    need = sum(parts.values())
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        where = "free GPU memory"
    else:
        free = _available_host_bytes()
        where = "available host memory (MemAvailable)"
    if free is not None and need > free:
        detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items())
        raise TrainingError(f"one training step needs about {_gib(need)} ({detail}), more than the {_gib(free)} of "
                            f"{where}; lower train.micro_batch (and raise train.grad_accum to keep the global "
                            f"batch), shorten train.seq_len, or set model.fused_linear_ce=true")
    warnings = []
    if accum > 1024:
        warnings.append(f"{accum:,} gradient-accumulation micro-batches per optimizer step (train.global_batch / "
                        f"(train.micro_batch x world size)): one step will take very long; is train.global_batch "
                        f"meant in sequences?")
    return warnings


# ---------------------------------------------------------------------------------------------- run lock


class RunLock:
    """An exclusive lock on a run directory (`RUN/.lock`, `metalm.locks.HeldLock`), held by rank 0 for the life of
    the run. A second trainer on the same train.run_dir fails at once, naming the holder's host, pid and start
    time. It is held while this object lives (keep a reference) and until `release`; a stale lock file never
    blocks a restart (the kernel releases the lock of a process that died)."""

    NAME = ".lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self.lock = HeldLock(self.path, lambda holder: (
            f"train.run_dir {self.path.parent} is in use by another trainer ({holder}); wait for it to finish, stop "
            f"it, or choose another train.run_dir"))

    def acquire(self) -> None:
        try:
            self.lock.acquire()
        except LockBusy as e:
            raise TrainingError(str(e)) from None

    def release(self) -> None:
        self.lock.release()
