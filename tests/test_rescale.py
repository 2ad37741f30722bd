"""Resuming on another number of processes and another ZeRO stage (issue 25 item 1), with real CPU runs (torchrun,
gloo) on real shards: the four commands of docs/reliability.md's "Changing the number of GPUs" recipe, run as
written with small overrides appended (a smaller model, 8 steps, the session's shards, AR steps only, each leg
stopping 2 steps later), checkpoint one run and resume it three times, each time on another split of the same
global batch of 8 (micro-batch 2):

    steps 1-2  2 processes x accum 2, ZeRO-2
    steps 3-4  1 process  x accum 4, ZeRO-2    (2 -> 1 process: DeepSpeed's universal checkpoint)
    steps 5-6  2 processes x accum 2, ZeRO-3   (1 -> 2 processes and ZeRO-2 -> 3)
    steps 7-8  1 process  x accum 4, ZeRO-1    (2 -> 1 process and ZeRO-3 -> 1)

and compare it with the same 8 steps run uninterrupted by the first command. The per-step losses agree to
float-reduction noise: the gradients are averaged over another grouping of the same 8 samples (DeepSpeed sums
the micro-batches of a rank, then all-reduces the ranks), a few float32 ulps; a loss is about 10.8, so
LOSS_TOLERANCE = 1e-5 is about 10 ulps, and a wrong optimizer state after a conversion shows at once above it (an
AdamW step counter shared by two parameter groups, as DeepSpeed's ZeRO-3 universal load leaves it, moves the loss
by 4e-5 one step later and 4e-3 two steps later). Each step reads exactly the uninterrupted run's samples
(data.record_samples: the ids of every micro-batch, counted per step), and the 8 steps read the 64 first
positions of the global order, none twice.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from procs import cpu_run_env, free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"
GLOBAL_BATCH = 8
STEPS = 8
LOSS_TOLERANCE = 1e-5
SMALL = [  # appended to the documented commands
    "train.seq_len=64", "model.max_seq_len=64", "model.n_layers=2", "train.micro_batch=2",
    f"train.global_batch={GLOBAL_BATCH}", f"train.max_steps={STEPS}", "train.log_every=1", "train.val_every=0",
    "optim.warmup_steps=2", "checkpoint.every=100", "logging.wandb=false", "logging.progress=false",
    "data.prepare_if_missing=false", "meta.enabled=false", "data.record_samples=true",
]
LEGS = [(2, 2), (1, 2), (2, 3), (1, 1)]  # (processes, ZeRO stage) of each documented command; 2 steps each


def documented_commands() -> list[str]:
    """The torchrun commands of the "Changing the number of GPUs" section of docs/reliability.md."""
    text = (REPO / "docs" / "reliability.md").read_text()
    section = text.split("## Changing the number of GPUs", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("torchrun ")]


def train(command: str, shards: Path, run_dir: Path, *extra: str) -> str:
    """The documented command, run from the repository with a free rendezvous port and the overrides appended."""
    line = " ".join([command.replace("torchrun ", f"torchrun --master_port={free_port()} ", 1), *SMALL,
                     f"data.shards={shards}", f"train.run_dir={run_dir}", *extra])
    env = cpu_run_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    out = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"`{line}` exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["ar_loss"] for r in rows if "lr" in r}


def samples_per_step(run_dir: Path) -> dict[int, list[int]]:
    """Step -> the sorted ids of the samples its micro-batches read, from every rank's record."""
    steps: dict[int, list[int]] = {}
    for record in sorted((run_dir / "samples").glob("rank_*.jsonl")):
        for line in record.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["position"] // GLOBAL_BATCH + 1, []).extend(row["ids"])
    return {step: sorted(ids) for step, ids in sorted(steps.items())}


def positions(run_dir: Path) -> Counter:
    """How often each global position was read, over every rank and leg."""
    seen: Counter = Counter()
    for record in (run_dir / "samples").glob("rank_*.jsonl"):
        for line in record.read_text().splitlines():
            row = json.loads(line)
            seen.update(range(row["position"], row["position"] + len(row["ids"])))
    return seen


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(the uninterrupted run of the first command, the run resumed by each next command, each leg's stdout)."""
    commands = documented_commands()
    shapes = [(int(re.search(r"--nproc_per_node=(\d+)", c).group(1)),
               int(m.group(1)) if (m := re.search(r"train\.zero_stage=(\d)", c)) else 2) for c in commands]
    assert shapes == LEGS, f"docs/reliability.md's recipe changed: {commands}"  # cpu-tiny.yaml runs ZeRO-2
    root = tmp_path_factory.mktemp("rescale")
    reference = root / "reference"
    train(commands[0], shards, reference, f"train.stop_at={STEPS}")
    resumed = root / "resumed"
    outs = [train(c, shards, resumed, f"train.stop_at={2 * (i + 1)}") for i, c in enumerate(commands)]
    return reference, resumed, outs


@pytest.mark.slow
def test_each_leg_converts_the_deepspeed_state_and_resumes(runs):
    _, resumed, outs = runs
    for i, ((nproc, zero), (was_nproc, was_zero), out) in enumerate(zip(LEGS[1:], LEGS, outs[1:])):
        stop = 2 * (i + 1)
        reason = [f"{was_nproc} process(es), this run has {nproc}"]
        if zero != was_zero:
            reason.append(f"ZeRO stage {was_zero}, this run has {zero}")
        assert f"step_{stop:08d} was written with {'; '.join(reason)}: converting" in out, out[-2000:]
        assert f"resumed from {resumed / 'checkpoints' / f'step_{stop:08d}'} at step {stop}" in out
    assert not list((resumed / "checkpoints").glob(".tmp-*"))  # the universal copies are removed after loading


@pytest.mark.slow
def test_resumed_on_other_splits_the_losses_are_the_uninterrupted_runs(runs):
    reference, resumed, _ = runs
    want, got = losses(reference), losses(resumed)
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    gaps = {step: abs(got[step] - want[step]) for step in want}
    assert all(gap <= LOSS_TOLERANCE for gap in gaps.values()), gaps
    assert got[1] == want[1] and got[2] == want[2]  # the first leg is the reference's own split: bit-identical


@pytest.mark.slow
def test_resumed_on_other_splits_each_step_reads_the_same_samples(runs):
    reference, resumed, _ = runs
    want, got = samples_per_step(reference), samples_per_step(resumed)
    assert list(got) == list(range(1, STEPS + 1))
    assert all(len(ids) == GLOBAL_BATCH for ids in got.values())
    assert got == want
    assert positions(resumed) == Counter(range(STEPS * GLOBAL_BATCH))  # each position once: none repeated or skipped
