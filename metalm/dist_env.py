"""Rank, world size and rendezvous address of one training process, from whatever started it.

    eval "$(python launchers/dist_env.py --export)"   # in each Slurm task (launchers/slurm/pretrain.sbatch)
    python launchers/dist_env.py                        # print what would be derived, as JSON
    python launchers/dist_env.py --rdzv-endpoint        # HOST:PORT for torchrun --rdzv_backend=c10d

`derive(env)` is a pure function of an environment mapping. Sources, first match wins:

1. A launcher that already set the variables (torchrun / torch.distributed.run, the deepspeed launcher):
   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are checked and passed through.
2. A Slurm task (srun, one task per GPU): SLURM_PROCID -> RANK, SLURM_NTASKS -> WORLD_SIZE,
   SLURM_LOCALID -> LOCAL_RANK; MASTER_ADDR is the first host of the step's node list (parsed here, so no
   `scontrol` is needed on compute nodes) and MASTER_PORT is derived from SLURM_JOB_ID, so every task of a
   job agrees on it without talking to the others and two jobs sharing a node rarely collide.
3. Neither: {} (a single process; metalm.train.engine then makes a process group of one by itself).

MASTER_ADDR and MASTER_PORT already present in the environment always win (export them in the batch script
to override the derivation). Inconsistent input (a rank outside the world, a node list whose length disagrees
with the node count, half of a launcher's variables) raises DistEnvError naming the variables.

Standard library only: this runs once per task, before torch is imported.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Mapping

KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_KEYS = ("RANK", "WORLD_SIZE")
# Ports derived from the job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN): above the well-known and common
# service ports, below Linux's default ephemeral range (32768-60999) that outgoing connections draw from.
PORT_BASE = 15000
PORT_SPAN = 15000
MAX_HOSTS = 100_000


class DistEnvError(ValueError):
    """The environment does not describe a consistent set of processes; the message names the variables."""


# ------------------------------------------------------------------------------------------- Slurm syntax


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1-2,4],b' -> ['a[1-2,4]', 'b']."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise DistEnvError(f"node list {s!r}: nested '[' is not valid Slurm host list syntax")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistEnvError(f"node list {s!r}: ']' without a matching '['")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise DistEnvError(f"node list {s!r}: '[' without a matching ']'")
    parts.append("".join(cur))
    return parts


def _expand_range_set(body: str, where: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07']; zero padding follows the width of the range's first number."""
    out: list[str] = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise DistEnvError(f"node list {where!r}: bad range {item!r} inside [...] (expected N or N-M)")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise DistEnvError(f"node list {where!r}: range {item!r} runs backwards")
        if hi - lo + 1 > MAX_HOSTS:
            raise DistEnvError(f"node list {where!r}: range {item!r} is implausibly large")
        width = len(lo_s)
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


def _expand_one(pattern: str, where: str) -> list[str]:
    """One host pattern, possibly with several bracket groups: 'r[1-2]n[3-4]' -> r1n3, r1n4, r2n3, r2n4."""
    hosts = [""]
    pos = 0
    for m in re.finditer(r"\[([^\]]*)\]", pattern):
        prefix = pattern[pos:m.start()]
        choices = _expand_range_set(m.group(1), where)
        hosts = [h + prefix + c for h in hosts for c in choices]
        if len(hosts) > MAX_HOSTS:
            raise DistEnvError(f"node list {where!r} expands to more than {MAX_HOSTS} hosts")
        pos = m.end()
    hosts = [h + pattern[pos:] for h in hosts]
    for h in hosts:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", h):
            raise DistEnvError(f"node list {where!r}: {h!r} is not a valid host name")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ('gpu[01-04]', 'node1,node2', 'a[1,3-4]-ib,b7') -> host names, in order."""
    s = nodelist.strip()
    if not s:
        raise DistEnvError("node list is empty")
    hosts: list[str] = []
    for part in _split_top_level(s):
        if not part:
            raise DistEnvError(f"node list {nodelist!r}: empty entry between commas")
        hosts.extend(_expand_one(part, nodelist))
        if len(hosts) > MAX_HOSTS:
            raise DistEnvError(f"node list {nodelist!r} expands to more than {MAX_HOSTS} hosts")
    return hosts


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE syntax: '4(x2),3' -> [4, 4, 3]."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise DistEnvError(f"SLURM_TASKS_PER_NODE={spec!r}: expected entries like 4 or 4(x2)")
        repeat = int(m.group(2) or 1)
        if repeat > MAX_HOSTS:
            raise DistEnvError(f"SLURM_TASKS_PER_NODE={spec!r}: implausible repeat count")
        counts.extend([int(m.group(1))] * repeat)
    return counts


def port_from_job_id(job_id: int) -> int:
    return PORT_BASE + job_id % PORT_SPAN


# ------------------------------------------------------------------------------------------- derivation


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = env[name]
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise DistEnvError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise DistEnvError(f"{name}={value}: expected >= {minimum}")
    return value


def _first(env: Mapping[str, str], *names: str) -> str | None:
    """The first of `names` present (and non-empty) in env."""
    for n in names:
        if env.get(n, "") != "":
            return n
    return None


def _port(env: Mapping[str, str], name: str) -> int:
    port = _int(env, name, minimum=1)
    if port > 65535:
        raise DistEnvError(f"{name}={port}: expected a TCP port, 1..65535")
    return port


def _from_launcher(env: Mapping[str, str]) -> dict[str, str]:
    missing = [k for k in LAUNCHER_KEYS if env.get(k, "") == ""]
    if missing:
        have = ", ".join(f"{k}={env[k]}" for k in KEYS if env.get(k, "") != "")
        raise DistEnvError(f"{', '.join(missing)} missing while {have} is set: a launcher sets RANK and "
                           "WORLD_SIZE together; unset the stray variables or set all of them")
    rank = _int(env, "RANK")
    world = _int(env, "WORLD_SIZE", minimum=1)
    if rank >= world:
        raise DistEnvError(f"RANK={rank} is outside WORLD_SIZE={world} (ranks are 0..{world - 1})")
    out = {"RANK": str(rank), "WORLD_SIZE": str(world)}
    if env.get("LOCAL_RANK", "") != "":
        local = _int(env, "LOCAL_RANK")
        if local > rank:
            raise DistEnvError(f"LOCAL_RANK={local} exceeds RANK={rank}: a process's rank on its node cannot "
                               "be larger than its global rank")
        if env.get("LOCAL_WORLD_SIZE", "") != "":
            local_world = _int(env, "LOCAL_WORLD_SIZE", minimum=1)
            if local >= local_world:
                raise DistEnvError(f"LOCAL_RANK={local} is outside LOCAL_WORLD_SIZE={local_world}")
        out["LOCAL_RANK"] = str(local)
    elif world == 1:
        out["LOCAL_RANK"] = "0"
    else:
        raise DistEnvError(f"LOCAL_RANK missing with WORLD_SIZE={world}: it selects this process's GPU")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if env.get(key, "") == "":
            if world == 1:
                continue  # a group of one: metalm.train.engine picks 127.0.0.1 and a free port
            raise DistEnvError(f"{key} missing with WORLD_SIZE={world}: every rank needs the rendezvous address")
    if env.get("MASTER_ADDR", "") != "":
        out["MASTER_ADDR"] = env["MASTER_ADDR"].strip()
    if env.get("MASTER_PORT", "") != "":
        out["MASTER_PORT"] = str(_port(env, "MASTER_PORT"))
    return out


def _from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    ntasks_var = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if ntasks_var is None:
        raise DistEnvError("SLURM_PROCID is set but SLURM_NTASKS is not: run the training command through "
                           "srun (one task per GPU), not directly in the batch script")
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, ntasks_var, minimum=1)
    if rank >= world:
        raise DistEnvError(f"SLURM_PROCID={rank} is outside {ntasks_var}={world} (ranks are 0..{world - 1})")

    nodelist_var = _first(env, "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
    hosts = expand_nodelist(env[nodelist_var]) if nodelist_var else None
    nnodes_var = _first(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    nnodes = _int(env, nnodes_var, minimum=1) if nnodes_var else (len(hosts) if hosts else None)
    if hosts is not None and nnodes is not None and len(hosts) != nnodes:
        raise DistEnvError(f"{nodelist_var}={env[nodelist_var]!r} names {len(hosts)} host(s) but "
                           f"{nnodes_var}={nnodes}")
    if nnodes is not None and nnodes > world:
        raise DistEnvError(f"{nnodes_var or nodelist_var}: {nnodes} nodes for {ntasks_var}={world} task(s): "
                           "every node needs at least one task")

    node = None
    if env.get("SLURM_NODEID", "") != "":
        node = _int(env, "SLURM_NODEID")
        if nnodes is not None and node >= nnodes:
            raise DistEnvError(f"SLURM_NODEID={node} is outside the {nnodes} node(s) of the step")

    if env.get("SLURM_LOCALID", "") != "":
        local = _int(env, "SLURM_LOCALID")
    elif nnodes == 1:
        local = rank  # one node: the rank on the node is the global rank
    else:
        raise DistEnvError("SLURM_LOCALID missing in a multi-node step: it selects this task's GPU")
    if local > rank:
        raise DistEnvError(f"SLURM_LOCALID={local} exceeds SLURM_PROCID={rank}: a task's rank on its node "
                           "cannot be larger than its global rank")

    tpn_var = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if tpn_var is not None:
        counts = parse_tasks_per_node(env[tpn_var])
        if sum(counts) != world:
            raise DistEnvError(f"{tpn_var}={env[tpn_var]!r} adds up to {sum(counts)} task(s) but "
                               f"{ntasks_var}={world}")
        if nnodes is not None and len(counts) != nnodes:
            raise DistEnvError(f"{tpn_var}={env[tpn_var]!r} describes {len(counts)} node(s) but the step has "
                               f"{nnodes}")
        if node is not None and node < len(counts) and local >= counts[node]:
            raise DistEnvError(f"SLURM_LOCALID={local} is outside the {counts[node]} task(s) of node "
                               f"SLURM_NODEID={node} ({tpn_var}={env[tpn_var]!r})")

    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}
    out["MASTER_ADDR"], out["MASTER_PORT"] = _slurm_master(env, hosts)
    return out


def _slurm_master(env: Mapping[str, str], hosts: list[str] | None) -> tuple[str, str]:
    if env.get("MASTER_ADDR", "") != "":
        addr = env["MASTER_ADDR"].strip()
    elif hosts:
        addr = hosts[0]  # task 0 runs on the first node of the step (block or cyclic layout)
    else:
        raise DistEnvError("no node list (SLURM_JOB_NODELIST / SLURM_NODELIST) and no MASTER_ADDR: cannot tell "
                           "where rank 0 runs")
    if env.get("MASTER_PORT", "") != "":
        return addr, str(_port(env, "MASTER_PORT"))
    job_var = _first(env, "SLURM_JOB_ID", "SLURM_JOBID")
    if job_var is None:
        raise DistEnvError("no SLURM_JOB_ID and no MASTER_PORT: cannot choose the rendezvous port")
    return addr, str(port_from_job_id(_int(env, job_var)))


def rendezvous_endpoint(env: Mapping[str, str]) -> str:
    """'HOST:PORT' of a job-wide rendezvous (torchrun --rdzv_endpoint) from the job's Slurm variables alone.

    For one torchrun per node under srun: the address and port every task of `derive` would agree on.
    """
    nodelist_var = _first(env, "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
    hosts = expand_nodelist(env[nodelist_var]) if nodelist_var else None
    addr, port = _slurm_master(env, hosts)
    return f"{addr}:{port}"


def derive(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (as strings) for the process described by `env`.

    A launcher's own variables win over Slurm's (torchrun inside an srun task is legitimate: the Slurm task is
    then one node's launcher, not a rank). Returns {} when `env` describes no distributed launch at all.
    """
    if any(env.get(k, "") != "" for k in LAUNCHER_KEYS + ("LOCAL_RANK",)):
        return _from_launcher(env)
    if env.get("SLURM_PROCID", "") != "":
        return _from_slurm(env)
    return {}


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    p = argparse.ArgumentParser(description="derive RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from "
                                            "a launcher's or Slurm's environment")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--export", action="store_true", help="print `export KEY=VALUE` lines for a shell to eval")
    fmt.add_argument("--json", action="store_true", help="print a JSON object (the default)")
    fmt.add_argument("--rdzv-endpoint", action="store_true",
                     help="print HOST:PORT for torchrun --rdzv_endpoint (one torchrun per node under Slurm)")
    args = p.parse_args(argv)
    source = os.environ if env is None else env
    try:
        if args.rdzv_endpoint:
            print(rendezvous_endpoint(source))
            return 0
        derived = derive(source)
    except DistEnvError as e:
        print(f"dist_env: {e}", file=sys.stderr)
        return 2
    if args.export:
        if not derived:
            print("# dist_env: no launcher or Slurm task variables found: a single process")
        for k in KEYS:
            if k in derived:
                print(f"export {k}={shlex.quote(derived[k])}")
    else:
        print(json.dumps(derived, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
