"""End-to-end training: the real launcher, real shards from the shared corpus, 1-2 CPU processes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from procs import cpu_run_env, free_port

from metalm import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"

# a small model on the real tokenizer; 2 processes x micro 4 x accum 2 = global 16
COMMON = [
    "--config", str(REPO / "configs" / "cpu-tiny.yaml"),
    "train.seq_len=64", "model.max_seq_len=64", "train.micro_batch=4", "train.global_batch=16",
    "model.n_layers=2", "train.max_steps=12", "train.log_every=1", "train.val_every=0", "optim.warmup_steps=3",
    "checkpoint.every=100", "logging.wandb=false", "logging.progress=false", "data.prepare_if_missing=false",
    "meta.n_way=4", "meta.k_shot=2", "meta.q_queries=2", "meta.inner_steps=3", "meta.hybrid_ratio=0.5",
]


def run_torchrun(run_dir: Path, shards: Path, *extra: str, nproc: int = 2, timeout: int = 240):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(LAUNCHER), *COMMON, f"data.shards={shards}", f"train.run_dir={run_dir}", *extra]
    out = subprocess.run(cmd, cwd=REPO, env=cpu_run_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("ar_loss"), r.get("meta_loss"), r.get("meta/query_acc")) for r in rows if "lr" in r]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_two_process_hybrid_resume_is_bit_identical(tmp_path, shards, zero):
    full, split = tmp_path / "full", tmp_path / "split"
    run_torchrun(full, shards, f"train.zero_stage={zero}")
    first = run_torchrun(split, shards, f"train.zero_stage={zero}", "train.stop_at=6")
    assert "stopped by train.stop_at=6" in first.stdout
    assert ckpt.find_latest(split / "checkpoints").name == "step_00000006"
    second = run_torchrun(split, shards, f"train.zero_stage={zero}")
    assert "resumed from" in second.stdout
    a, b = losses(full), losses(split)
    assert [r[0] for r in a] == list(range(1, 13))
    assert a == b  # exact equality: AR losses, meta losses and query accuracies after the resume
    assert any(r[2] is not None for r in a) and any(r[2] is None for r in a), "the schedule should mix meta steps in"


@pytest.mark.slow
def test_deepspeed_launcher_end_to_end(tmp_path, shards):
    """The README's main command shape: the `deepspeed` runner, 2 CPU processes, meta on, checkpoints."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank",
           "--master_port", str(free_port()), str(LAUNCHER), *COMMON, f"data.shards={shards}",
           f"train.run_dir={run_dir}", "checkpoint.every=5", "checkpoint.keep_last_k=2", "logging.progress=true",
           "train.val_every=6", "train.val_batches=2", "meta.classes=word_start"]
    out = subprocess.run(cmd, cwd=REPO, env=cpu_run_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 12/12" in out.stdout and "tok/s" in out.stdout and "eta" in out.stdout
    assert "metalm: done" in out.stdout and str(run_dir.resolve()) in out.stdout
    # the pace is shown after the first micro-batch, before any step has finished
    beat = out.stdout.find("metalm: step 1: micro-batch 1/2 after")
    assert 0 <= beat < out.stdout.find("step 12/12") and "per step" in out.stdout[beat:].splitlines()[0]
    kept = [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")]
    assert kept == ["step_00000010", "step_00000012"]  # keep_last_k=2 pruned step 5
    latest = ckpt.find_latest(run_dir / "checkpoints")
    assert latest.name == "step_00000012" and (latest / "meta_head.safetensors").is_file()
    state = ckpt.read_state(latest)
    assert state.step == 12 and state.world_size == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)
    assert any(r.get("meta_loss") is not None for r in rows) and any(r.get("ar_loss") is not None for r in rows)
    # the meta-gradient budget (the default): the achieved meta/AR ratio beside its target, on 2 ranks x ZeRO-2
    budget = [r for r in rows if r.get("meta/grad_ratio") is not None]
    assert budget and all(r["meta/grad_ratio_target"] == 0.1 for r in budget)
    assert all(abs(r["meta/grad_ratio"] - 0.1) < 1e-4 for r in budget)
    model, cfg = ckpt.load_model(latest)
    assert cfg.train.max_steps == 12 and model.cfg.n_layers == 2


def test_unknown_key_exits_nonzero_naming_it(tmp_path):
    out = subprocess.run([sys.executable, str(LAUNCHER), "--config", str(REPO / "configs" / "cpu-tiny.yaml"),
                          "train.max_stepz=3"], cwd=REPO, env=cpu_run_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "max_stepz" in out.stderr


def test_a_step_that_cannot_fit_in_memory_is_refused_before_any_work(tmp_path, shards):
    cmd = [sys.executable, str(LAUNCHER), *COMMON, f"data.shards={shards}", f"train.run_dir={tmp_path / 'big'}",
           "train.micro_batch=65536", "train.global_batch=65536"]
    out = subprocess.run(cmd, cwd=REPO, env=cpu_run_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("metalm: error"))
    assert "one training step needs about" in line and "available host memory" in line and "train.micro_batch" in line
    assert "Traceback" not in out.stderr


def test_an_empty_validation_split_is_refused_before_the_first_step(tmp_path, shared_data):
    """Shards whose validation split is empty, with periodic validation on: one line before any step (it used to
    crash at the first validation, before the first checkpoint, so every re-run repeated the same steps)."""
    from metalm.data.prepare import prepare

    src = tmp_path / "few.jsonl"
    with open(shared_data / "corpus" / "wiki-vital-en-fr-es.jsonl") as f:
        src.write_text("".join(line for _, line in zip(range(40), f)))
    shards = tmp_path / "shards"
    prepare(str(src), str(shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"), str(shards), 64,
            val_fraction=0.0, samples_per_shard=256, num_proc=1, text_field="text", seed=0)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(LAUNCHER), *COMMON, f"data.shards={shards}", f"train.run_dir={run_dir}",
           "train.val_every=4", "train.global_batch=8"]
    out = subprocess.run(cmd, cwd=REPO, env=cpu_run_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode != 0
    assert "the validation split is empty" in out.stderr and "train.val_every=0" in out.stderr
    assert "Traceback" not in out.stderr
    metrics = run_dir / "metrics.jsonl"
    assert not metrics.exists() or '"step"' not in metrics.read_text(), "steps ran before the refusal"
