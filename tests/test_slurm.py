"""The shipped Slurm scripts under a real Slurm (slurm-wlm on localhost, tests/slurm_cluster.py), driven by the
CPU recipe of docs/multi-node.md as written there: pretrain.sbatch trains with 2 tasks, `scancel --signal=TERM`
makes it checkpoint and exit, `scontrol requeue` resumes it to the end in the same log, and evaluate.sbatch
evaluates the run's checkpoints.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from doc_commands import documented
from procs import cpu_run_env, no_launcher_env
from slurm_cluster import SlurmCluster, missing

from metalm import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 30
TRAIN = [  # appended to the documented command: a smaller model, the session's shards, a few steps
    "train.seq_len=64", "model.max_seq_len=64", "train.micro_batch=4", "train.global_batch=8", "model.n_layers=2",
    f"train.max_steps={MAX_STEPS}", "train.log_every=1", "train.val_every=0", "optim.warmup_steps=3",
    "checkpoint.every=1000", "logging.wandb=false", "logging.progress=false", "data.prepare_if_missing=false",
    "meta.enabled=false",
]
EVAL = ["--config", "eval.metrics=[val_loss]", "eval.val_batches=2", "eval.batch_size=4", "eval.seq_len=64"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why is not None:  # CI installs slurm-wlm (.ci/run): a missing install fails, it does not skip
        pytest.fail(f"Slurm test cluster: {why}")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def job_env(log: Path) -> dict:
    """The submitting shell's environment: the interpreter as PYTHON, the job's log at `log` (SBATCH_OUTPUT wins
    over the script's #SBATCH --output), W&B offline, no launcher or Slurm variables of the test's own."""
    env = no_launcher_env(PYTHON=sys.executable, SBATCH_OUTPUT=str(log))
    env.update({k: v for k, v in cpu_run_env().items() if k not in env and k != "DS_ACCELERATOR"})
    return env


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line being written when we looked
            continue
        if "lr" in row:
            out.append(row["step"])
    return out


def test_documented_cpu_recipe_trains_stops_on_sigterm_requeues_resumes_and_evaluates(cluster, tmp_path, shards):
    train, stop, requeue, evaluate = documented(REPO / "docs" / "multi-node.md", "tests/test_slurm.py")
    assert [c[:2] for c in (train, stop, requeue, evaluate)] == [
        ["sbatch", "--nodes=1"], ["scancel", "--signal=TERM"], ["scontrol", "requeue"], ["sbatch", "--gpus=0"]]
    run_dir, log = tmp_path / "run", tmp_path / "train-%j.out"
    documented_run = train[-1].split("=", 1)[1]
    job = cluster.sbatch([*train[1:], *TRAIN, f"data.shards={shards}", f"train.run_dir={run_dir}"], cwd=REPO,
                         env=job_env(log))
    out = Path(str(log).replace("%j", str(job)))
    end = time.monotonic() + 240
    while max(steps(run_dir), default=0) < 3:
        state = cluster.state(job)
        assert state in {"PENDING", "CONFIGURING", "RUNNING"}, f"job {state}:\n{out.read_text()[-3000:]}"
        assert time.monotonic() < end, f"no step 3 after 240 s:\n{out.read_text()[-3000:]}\n{cluster.logs()}"
        time.sleep(0.1)
    cluster.command([w.replace("JOBID", str(job)) for w in stop])
    cluster.wait(job, {"COMPLETED"}, timeout=120)
    first = out.read_text()
    assert "metalm: stopped by SIGTERM at step" in first, first[-3000:]
    stopped_at = int(first.split("metalm: stopped by SIGTERM at step ")[1].split(";")[0])
    assert stopped_at < MAX_STEPS
    assert "2 process(es) on cpu" in first  # both Slurm tasks were ranks of one run
    latest = ckpt.find_latest(run_dir / "checkpoints")
    assert latest is not None and ckpt.read_state(latest).step == stopped_at
    assert ckpt.checkpoint_problem(latest, checksums=True) is None

    # allowed by the script's own --requeue (the test cluster has JobRequeue=0); the job starts again once its
    # old credential has expired (the test cluster's cred_expire=10)
    cluster.command([w.replace("JOBID", str(job)) for w in requeue])
    deadline = time.monotonic() + 240
    while cluster.job(job).get("Restarts") != "1" or cluster.state(job) != "COMPLETED":
        assert time.monotonic() < deadline, f"the requeued job did not complete:\n{cluster.job(job)}"
        assert cluster.state(job) not in {"FAILED", "CANCELLED", "TIMEOUT"}, out.read_text()[-3000:]
        time.sleep(0.5)
    second = out.read_text()
    assert second.startswith(first), "the requeued job's log replaced the first attempt's (--open-mode=append)"
    assert f"resumed from {latest}" in second[len(first):], second[-3000:]
    assert f"metalm: done, {MAX_STEPS} steps" in second
    assert sorted(set(steps(run_dir))) == list(range(1, MAX_STEPS + 1))
    assert ckpt.read_state(ckpt.find_latest(run_dir / "checkpoints")).step == MAX_STEPS

    elog = tmp_path / "eval-%j.out"
    ejob = cluster.sbatch([str(run_dir) if w == documented_run else w for w in evaluate[1:]] + EVAL, cwd=REPO,
                          env=job_env(elog))
    cluster.wait(ejob, {"COMPLETED"}, timeout=240)
    for step in (stopped_at, MAX_STEPS):
        result = json.loads((run_dir / "eval" / f"step_{step:08d}.json").read_text())
        assert result["step"] == step and result["metrics"]["val_loss"] > 0, result
