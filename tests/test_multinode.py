"""Two nodes on one machine: docs/multi-node.md's `torchrun --nnodes=2` command started twice (one process each,
a c10d rendezvous on 127.0.0.1, gloo) trains, checkpoints and resumes; killing one node makes the other exit
within train.collective_timeout with one clear line; a rank whose peers never come gives up after the same
timeout; and the timeout reaches the process groups DeepSpeed makes itself.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from doc_commands import documented
from procs import cpu_run_env, free_port, no_launcher_env

from torch.distributed import DistNetworkError, DistStoreError

from metalm import checkpoint as ckpt
from metalm.train.dist import collective_failure, rendezvous_error

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"
MAX_STEPS, EVERY, TIMEOUT = 20, 3, 20
COMMON = [  # appended to the documented command (the later of two overrides of a key wins)
    "train.seq_len=64", "model.max_seq_len=64", "train.micro_batch=4", "train.global_batch=8", "model.n_layers=2",
    f"train.max_steps={MAX_STEPS}", "train.log_every=1", "train.val_every=0", "optim.warmup_steps=3",
    f"checkpoint.every={EVERY}", "logging.wandb=false", "logging.progress=false", "data.prepare_if_missing=false",
    "meta.enabled=false", f"train.collective_timeout={TIMEOUT}",
]

pytestmark = pytest.mark.slow


class Node:
    """One node's launcher: `torchrun --nnodes=2 --nproc_per_node=1` in a session of its own, output in a file."""

    def __init__(self, index: int, port: int, run_dir: Path, shards: Path):
        """docs/multi-node.md's command: its port replaced by `port`, COMMON and the run's paths appended."""
        self.log = run_dir.parent / f"node{index}.log"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        (words,) = documented(REPO / "docs" / "multi-node.md", "tests/test_multinode.py")
        env = cpu_run_env()
        while "=" in words[0]:  # VAR=value before the program
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        assert words[0] == "torchrun", words
        cmd = [sys.executable, "-m", "torch.distributed.run",
               *[w.replace("127.0.0.1:29500", f"127.0.0.1:{port}") for w in words[1:]],
               *COMMON, f"data.shards={shards}", f"train.run_dir={run_dir}"]
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def processes(self) -> list:
        """torchrun and its rank (torchrun starts the rank in a session of its own)."""
        import psutil

        try:
            me = psutil.Process(self.proc.pid)
            return [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL to every process of this node at once: a machine that died."""
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        psutil.wait_procs(procs, timeout=10)


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written when we looked
            pass
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["ar_loss"] for r in rows(run_dir) if "lr" in r}


def wait_for(cond, nodes: list[Node], what: str, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not cond():
        for n in nodes:
            if n.proc.poll() is not None:
                raise AssertionError(f"a node ended (rc {n.proc.returncode}) before {what}:\n{n.output()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(n.output()[-2000:] for n in nodes))
        time.sleep(0.02)


def rank_zero_first(nodes: list[Node]) -> list[Node]:
    """The nodes, the one whose process got rank 0 first: the c10d rendezvous orders the nodes by (host address,
    launcher pid, ...), not by start order, and only rank 0 announces the model."""
    zero = [n for n in nodes if "metalm: model " in n.output()]
    assert len(zero) == 1, "\n".join(n.output()[-2000:] for n in nodes)
    return zero + [n for n in nodes if n is not zero[0]]


def test_two_nodes_train_a_killed_node_stops_the_other_and_both_resume(tmp_path, shards):
    run_dir, port = tmp_path / "run", free_port()
    nodes = [Node(i, port, run_dir, shards) for i in (0, 1)]
    try:
        wait_for(lambda: ckpt.find_latest(run_dir / "checkpoints") is not None and max(losses(run_dir), default=0) > 4,
                 nodes, "a checkpoint and step 5")
        survivor, victim = rank_zero_first(nodes)  # rank 0 survives: its error line is checked below
        victim.kill()
        killed = time.monotonic()
        survivor.proc.wait(timeout=TIMEOUT + 60)  # a hang fails here
        gone_after = time.monotonic() - killed
    finally:
        for n in nodes:
            n.kill()
    before = losses(run_dir)
    assert max(before) < MAX_STEPS, "the run finished before the kill: the test proves nothing"
    assert gone_after < TIMEOUT, f"the surviving node took {gone_after:.1f} s to exit"
    out = survivor.output()
    assert survivor.proc.returncode != 0
    line = [ln for ln in out.splitlines() if ln.startswith("metalm: error (rank 0): lost contact")]
    assert line and "train.collective_timeout=20 s" in line[0] and "rerun the same command" in line[0], out[-3000:]
    assert "[rank0]: Traceback" not in out, out[-3000:]

    resumed_from = ckpt.find_latest(run_dir / "checkpoints")
    start = ckpt.read_state(resumed_from).step
    again = [Node(i, port, run_dir, shards) for i in (0, 1)]
    try:
        for n in again:
            assert n.proc.wait(timeout=240) == 0, n.output()[-3000:]
    finally:
        for n in again:
            n.kill()
    assert f"resumed from {resumed_from}" in again[0].output() + again[1].output()
    after = losses(run_dir)
    assert sorted(after) == list(range(1, MAX_STEPS + 1))
    redone = [s for s in before if s > start]
    assert redone, "no step was logged after the checkpoint the run resumed from"
    # the steps the killed run logged after its checkpoint, trained again from it: the same losses exactly
    assert {s: after[s] for s in redone} == {s: before[s] for s in redone}


def test_a_rank_whose_peers_never_come_gives_up_after_the_collective_timeout(tmp_path, shards):
    """Rank 0 of 2, started alone (the other node never came): it waits at the rendezvous for
    train.collective_timeout and exits 1 with one line, instead of waiting torch's default 30 minutes."""
    env = no_launcher_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    env.update({k: v for k, v in cpu_run_env().items() if k not in env})
    cmd = [sys.executable, str(LAUNCHER), "--config", str(REPO / "configs" / "cpu-tiny.yaml"), *COMMON,
           f"data.shards={shards}", f"train.run_dir={tmp_path / 'run'}", "train.collective_timeout=3"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("metalm: error (rank 0): cannot rendezvous at 127.0.0.1:"), out.stderr[-3000:]
    assert "1/2 clients joined" in lines[-1] and "train.collective_timeout=3 s" in lines[-1]
    assert "Traceback" not in out.stderr


GROUP_TIMEOUTS = """
import sys
import torch
from torch.distributed import distributed_c10d
from metalm.config import load_config
from metalm.model import build_model
from metalm.train.engine import Engine, init_distributed

cfg = load_config(sys.argv[1], sys.argv[2:])
dist = init_distributed(cfg.train)
engine = Engine(build_model(cfg.model), cfg.optim, cfg.train, dist)
for pg in distributed_c10d._world.pg_map:
    print(pg.size(), pg._get_backend(torch.device("cpu")).options._timeout.total_seconds())
"""


def test_every_process_group_deepspeed_makes_gets_the_collective_timeout():
    """ZeRO-3 runs its collectives on groups DeepSpeed makes itself (a clone of the world group); torch would
    give those 30 minutes whatever the default group has."""
    env = no_launcher_env(**{k: v for k, v in cpu_run_env().items() if k.startswith(("DS_", "OMP_", "WANDB_"))})
    out = subprocess.run([sys.executable, "-c", GROUP_TIMEOUTS, str(REPO / "configs" / "cpu-tiny.yaml"),
                          "train.zero_stage=3", "train.collective_timeout=7", "model.n_layers=1", "meta.enabled=false"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    groups = [line.split() for line in out.stdout.strip().splitlines()]
    assert len(groups) >= 2, out.stdout  # the world group and DeepSpeed's own
    assert all(float(seconds) == 7.0 for _, seconds in groups), out.stdout


def _raised_in(filename: str, error: str) -> BaseException:
    """The exception `error` (an expression) raised from code whose file is `filename`."""
    try:
        exec(compile(f"raise {error}", filename, "exec"), {"DistNetworkError": DistNetworkError})
    except BaseException as e:  # noqa: BLE001 (returned for the test to inspect)
        return e
    raise AssertionError("not raised")


def test_collective_failures_are_told_apart_from_other_errors():
    c10d = "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py"
    gloo = _raised_in(c10d, "RuntimeError('[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                            "closed by peer [127.0.0.1]:54992. This is typically caused by a remote worker crashing.')")
    assert collective_failure(gloo, 45) == (
        "lost contact with the other processes of the run: Connection closed by peer [127.0.0.1]:54992 (one of them "
        "died, or none answered within train.collective_timeout=45 s); rerun the same command on every node to "
        "resume from the latest checkpoint")
    store = _raised_in("/anywhere/else.py", "DistNetworkError('Failed to recv, got 0 bytes.\\nframe #0: c10::')")
    assert collective_failure(store, 600).startswith("lost contact with the other processes of the run: Failed to "
                                                     "recv, got 0 bytes.")
    ours = _raised_in(str(REPO / "metalm" / "train" / "step.py"), "RuntimeError('shape mismatch')")
    assert collective_failure(ours, 600) is None  # a bug of ours keeps its traceback
    assert collective_failure(_raised_in(c10d, "ValueError('bad op')"), 600) is None
    assert collective_failure(_raised_in(c10d, "RuntimeError('Tensors must be contiguous')"), 600) is None


def test_a_rendezvous_that_timed_out_names_the_collective_timeout():
    error = DistStoreError("Timed out after 31 seconds waiting for clients. 1/2 clients joined.")
    line = rendezvous_error(error, {"MASTER_ADDR": "gpu01", "MASTER_PORT": "29500"}, 30)
    assert line == ("cannot rendezvous at gpu01:29500 (MASTER_ADDR:MASTER_PORT): Timed out after 31 seconds waiting "
                    "for clients. 1/2 clients joined.; not every process joined within train.collective_timeout=30 s: "
                    "start all of them (every node) with the same MASTER_ADDR:MASTER_PORT and world size")
