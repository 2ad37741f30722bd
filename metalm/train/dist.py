"""Who the ranks are, and how they agree: every decision that changes what a rank does next (skip an update,
stop, a failed save, an unusable directory) is reduced across ranks first, so no rank goes on alone into a
collective the others never reach."""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from collections.abc import Callable

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def rendezvous_error(error: Exception, env: dict, timeout_s: float | None = None) -> str:
    """One line for a failed rendezvous (torch's DistNetworkError: its message and C++ trace run to dozens of
    lines per rank): the address and port from the environment the launcher set, what went wrong, the fix."""
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    text = str(error)
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return (f"the rendezvous port {where} (MASTER_ADDR:MASTER_PORT) is already in use, by another job or a "
                f"run that has not exited: pick a free port with --master_port N (deepspeed, torchrun) or "
                f"MASTER_PORT=N (Slurm, a manual launch)")
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    if "timed out" in text.lower() and timeout_s is not None:  # a store wait (DistStoreError): not every rank came
        return (f"cannot rendezvous at {where} (MASTER_ADDR:MASTER_PORT): {first[:300]}; not every process joined "
                f"within train.collective_timeout={timeout_s:g} s: start all of them (every node) with the same "
                f"MASTER_ADDR:MASTER_PORT and world size")
    return (f"cannot rendezvous at {where} (MASTER_ADDR:MASTER_PORT): {first[:300]}; check that rank 0's host "
            f"is reachable there (--master_addr / --master_port, or MASTER_ADDR / MASTER_PORT)")


def collective_failure(error: BaseException, timeout_s: float) -> str | None:
    """One line for an error raised by a torch.distributed collective or store wait (another process died, or
    none answered within train.collective_timeout), None for any other error (a bug keeps its traceback). Torch
    raises DistError types (NCCL, the store); gloo raises plain RuntimeErrors whose message starts with its C++
    source location ("[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer ..."), recognised by that
    and by where they were raised (the innermost frame in the torch.distributed package)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    raised_in = tb.tb_frame.f_code.co_filename.replace("\\", "/") if tb is not None else ""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    from_gloo = re.match(r"\[[^\]]*/gloo/[^\]]*\]", first) is not None
    if not (isinstance(error, tdist.DistError)
            or (isinstance(error, RuntimeError) and from_gloo and "/torch/distributed/" in raised_in)):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:300]
    return (f"lost contact with the other processes of the run: {first} (one of them died, or none answered within "
            f"train.collective_timeout={timeout_s:g} s); rerun the same command on every node to resume from the "
            f"latest checkpoint")


class Collectives:
    def __init__(self, dist: Dist):
        self.dist = dist

    def reduce(self, values: list, op=tdist.ReduceOp.SUM) -> list[float]:
        """All-reduce numbers and 0-d tensors across ranks as one device tensor (the backend's device: NCCL
        reduces no CPU tensors); returns Python floats (one host sync)."""
        dev = self.dist.device
        t = torch.stack([v.detach().float().reshape(()).to(dev) if torch.is_tensor(v)
                         else torch.tensor(float(v), device=dev) for v in values])
        if self.dist.world_size > 1:
            tdist.all_reduce(t, op=op)
        return t.tolist()

    def all_true(self, flag: bool) -> bool:
        return self.reduce([1.0 if flag else 0.0], tdist.ReduceOp.MIN)[0] > 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.dist.world_size == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.dist.world_size == 1:
            return [obj]
        out: list = [None] * self.dist.world_size
        tdist.all_gather_object(out, obj)
        return out

    def agreed_message(self, msg: str | None) -> str | None:
        """The first rank's message when any rank has one, else None; identical on every rank."""
        if self.dist.world_size == 1:
            return msg
        if self.reduce([1.0 if msg else 0.0], tdist.ReduceOp.MAX)[0] == 0:
            return None
        return next(m for m in self.gather(msg) if m)

    def raise_agreed(self, msg: str | None, error: Callable[[str], Exception]) -> None:
        """If any rank has an error message, raise `error` with the first rank's message on every rank."""
        msg = self.agreed_message(msg)
        if msg is not None:
            raise error(msg)

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            tdist.barrier()

    def wait_for(self, seconds: float) -> None:
        """A barrier that waits up to `seconds` rather than train.collective_timeout: for a wait as long as some
        work of one rank (rank 0 preparing the shards). It runs on a gloo group made for it (CPU, whatever the
        run's backend) and dropped after; a rank that dies meanwhile still ends the wait at once (its
        connection closes)."""
        if self.dist.world_size == 1:
            return
        group = tdist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
        try:
            tdist.barrier(group=group)
        finally:
            tdist.destroy_process_group(group)
