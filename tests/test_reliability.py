"""Faults during real 2-process training runs (torchrun, CPU, real shards), and what survives them.

Every run here uses the same deterministic configuration, so one uninterrupted reference run tells what each
interrupted-then-resumed run must have logged: its metrics.jsonl (timings aside) must equal the reference's
line for line, which holds only if the resume restored model, optimizer, scheduler, data position and RNG
exactly from a checkpoint that was complete and uncorrupted.

Faults: kill -9 of the whole process group at a random step; SIGTERM to torchrun, or to one rank; a second
SIGTERM while the checkpoint is being written; a full disk while saving (a real tmpfs, when `mount` works);
a NaN loss on one rank only; a checkpoint corrupted on disk; shards with another tokenizer.

Test-only behaviour (a slow filesystem, a NaN on one rank) comes from wrappers in this file, run by torchrun
in place of launchers/pretrain.py (`python tests/test_reliability.py WORKER MODE ...`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import cpu_run_env, free_port

from metalm import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"
MAX_STEPS, EVERY = 12, 3
COMMON = [
    "--config", str(REPO / "configs" / "cpu-tiny.yaml"),
    "train.seq_len=64", "model.max_seq_len=64", "train.micro_batch=4", "train.global_batch=16",
    "model.n_layers=2", f"train.max_steps={MAX_STEPS}", "train.log_every=1", "train.val_every=0",
    "optim.warmup_steps=3", f"checkpoint.every={EVERY}", "checkpoint.keep_last_k=2", "logging.wandb=false",
    "logging.progress=false", "data.prepare_if_missing=false", "meta.n_way=4", "meta.k_shot=2", "meta.q_queries=2",
    "meta.inner_steps=3", "meta.hybrid_ratio=0.5",
]
TIMING = ("time", "tokens_per_s", "mfu")
NAN_STEP = 5

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ helpers


def _cmd(run_dir: Path, shards: Path, *extra: str, worker: str | None = None) -> list[str]:
    script = [str(LAUNCHER)] if worker is None else [str(Path(__file__).resolve()), "WORKER", worker]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            *script, *COMMON, f"data.shards={shards}", f"train.run_dir={run_dir}", *extra]


def run(run_dir: Path, shards: Path, *extra: str, worker: str | None = None, ok: bool = True):
    out = subprocess.run(_cmd(run_dir, shards, *extra, worker=worker), cwd=REPO, env=cpu_run_env(), capture_output=True,
                         text=True, timeout=300)
    if ok:
        assert out.returncode == 0, _failure(out.stdout + out.stderr)
    return out


def _failure(text: str) -> str:
    """The informative part of a failed run's output: rank errors, tracebacks, aborts, then the tail."""
    keys = ("rank0]", "rank1]", "metalm: error", "terminate called", "what():", "Error", "Traceback")
    picked = [ln for ln in text.splitlines() if any(k in ln for k in keys)]
    return "\n".join(picked[-60:]) + "\n---\n" + text[-2000:]


class Run:
    """A training run in its own session (process group), its output in files, for faults from outside."""

    def __init__(self, run_dir: Path, shards: Path, *extra: str, worker: str | None = None):
        self.run_dir = run_dir
        self.log = run_dir.parent / f"{run_dir.name}.log"
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.log, "w")  # noqa: SIM115 (the process's output file, open as long as it runs)
        self.proc = subprocess.Popen(_cmd(run_dir, shards, *extra, worker=worker), cwd=REPO, env=cpu_run_env(),
                                     stdout=self._f, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, cond, what: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {self.proc.returncode}) before {what}:\n"
                                     + self.output()[-3000:])
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n" + self.output()[-3000:])
            time.sleep(0.02)

    def logged_step(self) -> int:
        steps = [r["step"] for r in rows(self.run_dir) if "lr" in r]
        return max(steps, default=0)

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the training processes (torchrun's children)."""
        import psutil

        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.Error, OSError):
                continue
            if rank is not None:
                out[int(rank)] = child.pid
        return out

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._f.close()

    def kill(self) -> None:
        """SIGKILL to torchrun and every rank at once (a preempted machine). torchrun starts each rank in a
        session of its own, so killing torchrun's process group alone would not reach them."""
        import psutil

        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        psutil.wait_procs(procs, timeout=10)
        self._f.close()


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written when we looked
            pass
    return out


def comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(run_dir)]


def latest(run_dir: Path) -> Path | None:
    return ckpt.find_latest(run_dir / "checkpoints")


def assert_sound(run_dir: Path) -> Path:
    """`latest` names a complete checkpoint whose every file matches the sha256 in its marker."""
    pointer = (run_dir / "checkpoints" / "latest").read_text().strip()
    path = run_dir / "checkpoints" / pointer
    assert ckpt.checkpoint_problem(path, checksums=True) is None, ckpt.checkpoint_problem(path, checksums=True)
    return path


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(run_dir, shards)
    assert [r["step"] for r in rows(run_dir) if "lr" in r] == list(range(1, MAX_STEPS + 1))
    return run_dir


# ------------------------------------------------------------------------------------------------ kill -9


def test_kill_9_at_a_random_step_then_rerun_resumes_bit_identically(tmp_path, shards, reference):
    seed = int(os.environ.get("METALM_KILL_SEED", random.randrange(1 << 30)))
    target = random.Random(seed).randint(EVERY + 1, MAX_STEPS - 1)
    run_dir = tmp_path / "run"
    r = Run(run_dir, shards)
    r.wait_until(lambda: latest(run_dir) is not None and r.logged_step() >= target, f"step {target}")
    r.kill()  # SIGKILL to torchrun and both ranks: no handler, no cleanup
    killed_at = r.logged_step()
    resumed_from = assert_sound(run_dir)
    assert EVERY <= ckpt.read_state(resumed_from).step <= killed_at

    again = run(run_dir, shards)  # the same command
    assert f"resumed from {resumed_from}" in again.stdout, f"METALM_KILL_SEED={seed}"
    assert comparable(run_dir) == comparable(reference), f"METALM_KILL_SEED={seed} (killed at step {killed_at})"
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the interrupted save's leftovers were not removed"


def test_kill_9_of_torchrun_alone_stops_the_ranks_cleanly(tmp_path, shards, reference):
    """The ranks would otherwise go on training as orphans beside the restarted job."""
    import psutil

    run_dir = tmp_path / "run"
    r = Run(run_dir, shards)
    r.wait_until(lambda: latest(run_dir) is not None and r.logged_step() >= EVERY + 1, "the first checkpoint")
    ranks = [psutil.Process(pid) for pid in r.ranks().values()]
    os.killpg(r.proc.pid, signal.SIGKILL)  # torchrun's own process group: the ranks are not in it
    r.wait()
    _, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, "ranks kept running after torchrun died"
    out = r.output()
    assert "SIGTERM received" in out and "metalm: stopped by SIGTERM at step" in out, out[-3000:]
    step = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert step < MAX_STEPS and assert_sound(run_dir).name == ckpt.step_dir_name(step)
    assert comparable(run_dir) == comparable(reference)[:len(comparable(run_dir))]


# ------------------------------------------------------------------------------------------------ signals


def test_sigterm_to_torchrun_checkpoints_at_the_next_step_and_exits(tmp_path, shards, reference):
    run_dir = tmp_path / "run"
    r = Run(run_dir, shards)
    r.wait_until(lambda: latest(run_dir) is not None and r.logged_step() >= EVERY + 1, "the first checkpoint")
    os.kill(r.proc.pid, signal.SIGTERM)  # torchrun forwards it to both ranks
    r.wait(timeout=90)
    out = r.output()
    stopped = [line for line in out.splitlines() if "metalm: stopped by SIGTERM at step" in line]
    assert stopped, out[-3000:]
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert step % EVERY and EVERY < step < MAX_STEPS  # a step boundary that is no regular checkpoint step
    assert assert_sound(run_dir).name == ckpt.step_dir_name(step)
    assert "Traceback" not in out.split("Received")[0] and "metalm: error" not in out
    assert comparable(run_dir) == comparable(reference)[:len(comparable(run_dir))]


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, shards, reference):
    run_dir = tmp_path / "run"
    r = Run(run_dir, shards)
    r.wait_until(lambda: latest(run_dir) is not None and r.logged_step() >= EVERY + 1, "the first checkpoint")
    os.kill(r.ranks()[1], signal.SIGTERM)
    assert r.wait(timeout=90) == 0, r.output()[-3000:]  # both ranks exited 0, so torchrun did too
    out = r.output()
    assert "stopped by a signal (to another rank) at step" in out  # rank 0 learned it from the all-reduce
    step = int(out.split("to another rank) at step ")[1].split(";")[0])
    final = assert_sound(run_dir)
    assert final.name == ckpt.step_dir_name(step)
    assert (final / "rank_00000.pt").is_file() and (final / "rank_00001.pt").is_file()
    assert ckpt.read_state(final).step == step == max(r["step"] for r in rows(run_dir))


def test_second_sigterm_during_the_save_exits_at_once_and_corrupts_nothing(tmp_path, shards, reference):
    run_dir = tmp_path / "run"
    r = Run(run_dir, shards, worker="slow-save")  # each save pauses 1.5 s before sealing it
    r.wait_until(lambda: latest(run_dir) is not None and r.logged_step() >= EVERY + 1, "the first checkpoint")
    before = latest(run_dir)
    rank0 = r.ranks()[0]
    os.kill(rank0, signal.SIGTERM)
    sent = time.monotonic()
    r.wait_until(lambda: any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir()),
                 "the stop checkpoint to start")
    time.sleep(max(0.0, 0.6 - (time.monotonic() - sent)))  # past the window for a duplicate delivery
    os.kill(rank0, signal.SIGTERM)
    rc = r.wait(timeout=90)
    out = r.output()
    assert rc != 0 and "second SIGTERM: exiting now" in out, out[-3000:]
    assert latest(run_dir) == before and assert_sound(run_dir) == before  # `latest` never moved
    assert list((run_dir / "checkpoints").glob(".tmp-step_*"))  # the abandoned save is there, unsealed

    again = run(run_dir, shards)
    assert f"resumed from {before}" in again.stdout
    assert comparable(run_dir) == comparable(reference)


# ------------------------------------------------------------------------------------------------ disk full


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 180 MiB tmpfs (one checkpoint of this run is ~115 MB), mounted where the checkpoints go."""
    mnt = tmp_path / "run" / "checkpoints"
    mnt.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=180m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()}); the in-process ENOSPC test "
                    "in test_reliability_units.py covers the logic")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_mid_run_keeps_the_last_checkpoint_and_stops_clearly(tmp_path, shards, reference, small_tmpfs):
    run_dir = tmp_path / "run"
    out = run(run_dir, shards, "checkpoint.check_free_space=false", "checkpoint.keep_last_k=1", ok=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    # step 3 saved; step 6 failed (warned, training went on); step 9 failed again: stop, naming path and errno
    assert "checkpoint of step 6 in " in text and ".tmp-step_00000006 failed" in text
    assert "training goes on and retries at the next checkpoint" in text
    assert "checkpoint of step 9" in text and "stopping after 2 failed saves in a row" in text
    assert "ENOSPC" in text or "No space left on device" in text, text[-3000:]
    assert latest(run_dir).name == "step_00000003" and assert_sound(run_dir).name == "step_00000003"
    assert not list(small_tmpfs.glob(".tmp-*")), "a failed save left its partial directory behind"
    failed = [r["step"] for r in rows(run_dir) if "checkpoint_failed" in r]
    assert failed == [6, 9]

    subprocess.run(["mount", "-o", "remount,size=1g", str(small_tmpfs)], check=True)
    again = run(run_dir, shards, "checkpoint.keep_last_k=1")
    assert "resumed from" in again.stdout and "step_00000003" in again.stdout
    assert [r for r in comparable(run_dir) if "checkpoint_failed" not in r] == comparable(reference)


# ------------------------------------------------------------------------------------------------ NaN


def test_nan_on_one_rank_skips_the_step_on_both(tmp_path, shards, reference):
    run_dir = tmp_path / "run"
    out = run(run_dir, shards, worker="nan-rank1")
    assert f"non-finite loss at step {NAN_STEP} on 1 rank(s): its update is skipped" in out.stderr
    by_step = {r["step"]: r for r in rows(run_dir) if "lr" in r}
    assert [s for s, r in by_step.items() if r["nonfinite_skipped"]] == [NAN_STEP]  # logged by rank 0
    assert "ar_loss" not in by_step[NAN_STEP] and "meta_loss" not in by_step[NAN_STEP]  # no NaN in the logs
    ref = {r["step"]: r for r in comparable(reference) if "lr" in r}
    for s in range(1, NAN_STEP):
        assert {k: v for k, v in by_step[s].items() if k not in TIMING} == ref[s]
    later = [by_step[s].get("ar_loss", by_step[s].get("meta_loss")) for s in range(NAN_STEP + 1, MAX_STEPS + 1)]
    assert all(v is not None and v == v and v < 20 for v in later), later  # finite, training went on
    assert assert_sound(run_dir).name == ckpt.step_dir_name(MAX_STEPS)


# ------------------------------------------------------------------------------------------------ bad files


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, shards, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = latest(run_dir)
    assert newest.name == ckpt.step_dir_name(MAX_STEPS)
    victim = newest / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit, same size: only the sha256 can tell
    victim.write_bytes(bytes(data))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(reference)))

    again = run(run_dir, shards)
    previous = ckpt.step_dir_name(MAX_STEPS - EVERY)  # keep_last_k=2 kept it; MAX_STEPS is a multiple of EVERY
    assert f"ignoring checkpoint {newest}" in again.stderr and "sha256 differs" in again.stderr
    assert f"resumed from {run_dir / 'checkpoints' / previous}" in again.stdout
    assert comparable(run_dir) == comparable(reference)  # the redone steps are the same steps
    assert assert_sound(run_dir).name == ckpt.step_dir_name(MAX_STEPS)  # and the re-saved checkpoint is sound


class Payload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_a_pickle_in_one_ranks_state_stops_every_rank_with_one_line(tmp_path, shards, reference):
    import torch

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = latest(run_dir)
    sentinel = tmp_path / "pwned"
    victim = newest / "rank_00001.pt"
    torch.save({"data": "{}", "rng": {"torch": Payload(sentinel)}}, victim)
    marker = json.loads((newest / ckpt.MARKER).read_text())
    marker["files"]["rank_00001.pt"] = ckpt.record_files(newest, ["rank_00001.pt"], checksums=True)["rank_00001.pt"]
    (newest / ckpt.MARKER).write_text(json.dumps(marker))  # a tamperer who also rewrote the marker

    out = run(run_dir, shards, f"train.max_steps={MAX_STEPS + 3}", ok=False)
    assert out.returncode != 0 and not sentinel.exists()
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("metalm: error")]
    assert len(errors) == 2, _failure(out.stdout + out.stderr)  # both ranks stop, each with one line
    assert all(f"rank 1: {victim}: refusing to unpickle it" in ln and "GLOBAL posix.system" in ln for ln in errors)
    # no traceback from our code or torch.load's advice (torchrun still reports its failed children its own way)
    assert f'File "{REPO / "metalm"}' not in out.stderr and "weights_only=False" not in out.stderr


def test_a_second_trainer_on_the_same_run_directory_exits_at_once(tmp_path, shards):
    run_dir = tmp_path / "run"
    first = Run(run_dir, shards, "train.max_steps=400", "checkpoint.every=1000")
    try:
        first.wait_until(lambda: first.logged_step() >= 1, "the first trainer's first step")
        t0 = time.monotonic()
        second = run(run_dir, shards, ok=False)
        assert second.returncode != 0 and time.monotonic() - t0 < 60
        assert f"train.run_dir {run_dir} is in use by another trainer (host " in second.stderr
        assert "pid " in second.stderr and f'File "{REPO / "metalm"}' not in second.stderr
        assert first.proc.poll() is None  # the first one trains on, its files untouched
    finally:
        first.kill()
    steps = [r["step"] for r in rows(run_dir) if "lr" in r]
    assert steps == sorted(steps) == list(range(1, len(steps) + 1))  # one writer: no interleaving


def test_checkpoint_size_estimate_matches_a_real_checkpoint(reference):
    from metalm.config import load_config
    from metalm.train.preflight import checkpoint_bytes
    from metalm.train.module import PretrainModule

    cfg = load_config(REPO / "configs" / "cpu-tiny.yaml", [a for a in COMMON if "=" in a])
    n = sum(p.numel() for p in PretrainModule.from_config(cfg).parameters())
    newest = latest(reference)
    actual = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    estimate = checkpoint_bytes(n, cfg.train.precision, cfg.train.zero_stage)
    assert 0.9 * actual <= estimate <= 1.3 * actual, (estimate, actual)


def test_resume_with_shards_of_another_tokenizer_is_refused(tmp_path, shards, reference, shared_data):
    from metalm.data.prepare import prepare

    tok = json.loads((shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json").read_text())
    tok["added_tokens"].append({"id": len(tok["model"]["vocab"]), "content": "<|extra|>", "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "tok.json").write_text(json.dumps(tok))
    prepare(str(shards.parent / "slice.jsonl"), str(tmp_path / "tok.json"), str(tmp_path / "shards"), 64,
            val_fraction=0.05, samples_per_shard=256, num_proc=1, text_field="text", seed=0)
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    out = run(run_dir, tmp_path / "shards", f"data.tokenizer={tmp_path / 'tok.json'}",
              f"train.max_steps={MAX_STEPS + 2}", ok=False)
    assert out.returncode != 0
    assert "cannot resume from" in out.stderr and "tokenizer mismatch" in out.stderr, out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ workers


def _worker(mode: str, argv: list[str]) -> None:
    """torchrun runs this in place of launchers/pretrain.py: the real launcher, plus one test-only fault."""
    sys.path.insert(0, str(REPO / "launchers"))
    if mode == "slow-save":
        import metalm.checkpoint as checkpoint

        record = checkpoint.record_files

        def slow_record(*args, **kwargs):
            time.sleep(1.5)  # a slow filesystem: the save is still unsealed for a while
            return record(*args, **kwargs)

        checkpoint.record_files = slow_record
    elif mode == "nan-rank1":
        from metalm.train.module import PretrainModule

        forward, calls = PretrainModule.forward, {"n": 0}
        accum = 2  # global 16 = micro 4 x accum 2 x world 2

        def nan_forward(self, batch, episode=None):
            losses, stats = forward(self, batch, episode=episode)
            calls["n"] += 1
            if os.environ.get("RANK") == "1" and calls["n"] == (NAN_STEP - 1) * accum + 2:
                losses = {k: v * float("nan") for k, v in losses.items()}  # rank 1, step NAN_STEP, 2nd micro-batch
            return losses, stats

        PretrainModule.forward = nan_forward
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
    import pretrain

    pretrain.exit_now(pretrain.main(argv))


if __name__ == "__main__" and sys.argv[1:2] == ["WORKER"]:
    _worker(sys.argv[2], sys.argv[3:])
