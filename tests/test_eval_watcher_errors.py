"""The evaluator's failure paths, on real checkpoints: corrupted files, a device or option that cannot work,
a watched directory that is missing, checkpoints held back by earlier errors, a checkpoint that stays broken,
and metrics skipped for want of data (with the shards the run recorded in its trainer state)."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from metalm.checkpoint import MARKER, checkpoint_files, checkpoint_problem, load_model, record_files
from metalm.checkpoint.layout import MARKER_FORMAT
from metalm.config import ConfigError
from metalm.eval import watcher as W
from eval_cases import TEXT, jsonl, make_ckpt

REPO = Path(__file__).resolve().parents[1]


def seal(d: Path, step: int) -> Path:
    """The COMPLETE marker a real save writes: every file's size and sha256."""
    files = record_files(d, checkpoint_files(d), checksums=True)
    (d / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "version": 1, "step": step, "files": files}))
    return d


def sealed_ckpt(root: Path, step: int, assets: Path, extra=()) -> Path:
    return seal(make_ckpt(root, step, assets, complete=False, extra=extra), step)


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory, assets):
    """Real shards (seq_len 32, the tiny config's train.seq_len) made with the checkpoints' own tokenizer."""
    from metalm.data.prepare import prepare

    d = tmp_path_factory.mktemp("toy-shards")
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT * 40))
    prepare(str(d / "docs.jsonl"), str(assets / "tokenizer.json"), str(d / "shards"), 32, val_fraction=0.2,
            samples_per_shard=16, num_proc=1, seed=0, progress=False)
    return d / "shards"


# ------------------------------------------------------------------------------------- 1. corrupted files


@pytest.mark.parametrize("victim", ["model.safetensors", "config.yaml"])
def test_corrupted_file_is_an_error_naming_it_and_the_original_checkpoint(tmp_path, assets, caplog, monkeypatch,
                                                                          victim):
    run = tmp_path / "run"
    bad = sealed_ckpt(run, 10, assets)
    sealed_ckpt(run, 20, assets)
    f = bad / victim
    data = bytearray(f.read_bytes())
    if victim == "model.safetensors":
        mid = len(data) // 2  # inside the tensor data: the file still parses, only the weights change
        data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])
    else:
        i = data.index(b"n_layers: 2")
        data[i:i + 11] = b"n_layers: 1"  # same size, still valid YAML
    f.write_bytes(bytes(data))
    assert f.stat().st_size == len(data)
    if victim == "model.safetensors":
        load_model(bad, "cpu", verify=False)  # without the sha256 check these weights would be evaluated

    seen = {}
    real = W.evaluate_checkpoint

    def spy(snap, *a, **k):
        snap = Path(snap)
        seen[snap.name.split("-")[0]] = {
            "marker": (snap / MARKER).is_file(), "snap": str(snap),
            "problem": checkpoint_problem(snap, checksums=True, only=("config.yaml", "model.safetensors"))}
        return real(snap, *a, **k)

    monkeypatch.setattr(W, "evaluate_checkpoint", spy)
    caplog.set_level("INFO")
    w = W.Watcher(str(run), wandb=False, device="cpu")
    assert w.run(once=True) == 1  # a failure in this pass
    ev = run / "eval"
    assert w.evaluated == ["step_00000020"]
    assert not (ev / "step_00000010.json").exists()
    assert [r["checkpoint"] for r in jsonl(ev / "eval.jsonl")] == ["step_00000020"]
    err = json.loads((ev / "step_00000010.error.json").read_text())
    assert f"{victim}: sha256 differs from the {MARKER} marker" in err["error"]
    assert err["error"].startswith(f"CheckpointError: {bad} is not a usable checkpoint")
    assert ".snapshots" not in err["error"] and ".snapshots" not in caplog.text
    # the snapshot carries the marker, so the verification ran on the very files that were evaluated
    look = seen["step_00000010"]
    assert look["marker"] and f"{victim}: sha256 differs" in look["problem"] and ".snapshots" in look["snap"]
    assert seen["step_00000020"]["marker"] and seen["step_00000020"]["problem"] is None
    failed = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(failed) == 1 and str(bad) in failed[0].getMessage() and failed[0].exc_info is None


def test_corrupted_trainer_state_is_an_error_too(tmp_path, assets):
    run = tmp_path / "run"
    d = sealed_ckpt(run, 10, assets)
    state = d / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 10', '"step": 90'))  # same size, another step
    w = W.Watcher(str(run), wandb=False, device="cpu")
    assert w.run(once=True) == 1
    err = json.loads((run / "eval" / "step_00000010.error.json").read_text())["error"]
    assert f"{d} is not a usable checkpoint: trainer_state.json: sha256 differs" in err


# --------------------------------------------------------------------------- 2. checked before anything


def test_device_cuda_without_cuda_is_one_line_up_front(tmp_path, assets):
    run = tmp_path / "run"
    sealed_ckpt(run, 10, assets)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, even on a GPU host
    p = subprocess.run([sys.executable, str(REPO / "launchers" / "evaluate.py"), "--watch", str(run), "--once",
                        "--no-wandb", "--device", "cuda"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = stderr_lines(p.stderr)
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("metalm-evaluate: --device cuda: no CUDA device is visible ("), lines[0]
    assert "--device cpu" in lines[0]
    assert not (run / "eval").exists()  # no error file, no lock, no results directory


def test_device_errors_in_process(tmp_path, assets, monkeypatch, capsys):
    run = tmp_path / "run"
    ck = sealed_ckpt(run, 10, assets)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for args in (["--watch", str(run), "--once"], ["--checkpoint", str(ck)]):
        for dev in ("cuda", "cuda:1", "gpu"):
            assert W.main(args + ["--no-wandb", "--device", dev]) == 2
            (line,) = stderr_lines(capsys.readouterr().err)
            want = "no CUDA device is visible" if dev.startswith("cuda") else "not a device"
            assert line.startswith(f"metalm-evaluate: --device {dev}: {want}"), line
    assert not (run / "eval").exists()
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        W.Watcher(str(run), wandb=False, device="cuda")


def test_bad_override_is_one_line_up_front(tmp_path, assets, capsys):
    run = tmp_path / "run"
    sealed_ckpt(run, 10, assets)
    with pytest.raises(ConfigError, match="eval.ner.mode"):
        W.Watcher(str(run), overrides=["eval.ner.mode=bogus"], wandb=False, device="cpu")
    for bad in ("eval.metrics=[bogus]", "eval.batch_size=abc", "nope.key=1", "no-equals-sign"):
        assert W.main(["--watch", str(run), "--once", "--no-wandb", "--device", "cpu", "--config", bad]) == 2
        (line,) = stderr_lines(capsys.readouterr().err)
        assert line.startswith("metalm-evaluate: configuration error: "), line
    assert not (run / "eval").exists()


# --------------------------------------------------------------------- 3 + 4. exit status, held-back list


def test_once_exits_1_on_failure_and_each_pass_lists_what_is_held_back(tmp_path, assets, caplog):
    run = tmp_path / "run"
    sealed_ckpt(run, 1, assets)
    bad = make_ckpt(run, 2, assets)  # legacy marker: nothing to verify against; the file itself is unreadable
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    ev = run / "eval"
    args = ["--watch", str(run), "--once", "--no-wandb", "--device", "cpu"]
    caplog.set_level("INFO")
    assert W.main(args) == 1
    assert (ev / "step_00000001.json").is_file() and (ev / "step_00000002.error.json").is_file()
    assert "held back" not in caplog.text  # nothing was held back at the start of this pass

    caplog.clear()
    assert W.main(args) == 0  # nothing failed in this pass
    held = [r for r in caplog.records if "held back" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in held] == [
        ("WARNING", f"held back by earlier errors: step_00000002 ({ev / 'step_00000002.error.json'}); "
                    f"delete the error file to retry")]
    assert "evaluating step_00000002" not in caplog.text

    make_ckpt(run, 3, assets)
    (run / "checkpoints" / "step_00000003" / "model.safetensors").write_bytes(b"")
    assert W.main(args) == 1
    caplog.clear()
    assert W.main(args) == 0
    (msg,) = [r.getMessage() for r in caplog.records if "held back" in r.getMessage()]
    assert msg == (f"held back by earlier errors: step_00000002 ({ev / 'step_00000002.error.json'}), "
                   f"step_00000003 ({ev / 'step_00000003.error.json'}); delete the error file to retry")

    (ev / "step_00000002.error.json").unlink()  # the documented way to retry
    caplog.clear()
    assert W.main(args) == 1 and "evaluating step_00000002" in caplog.text


# -------------------------------------------------------------------------------- 5. the watched directory


def test_watch_a_missing_directory_is_an_error_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "runs" / "not-started"
    assert W.main(["--watch", str(missing), "--once", "--no-wandb", "--device", "cpu"]) == 2
    (line,) = stderr_lines(capsys.readouterr().err)
    assert line.startswith(f"metalm-evaluate: --watch {missing}: no such directory"), line
    assert "--wait-for-dir" in line
    assert not (tmp_path / "runs").exists()
    assert W.main(["--checkpoint", str(missing / "checkpoints" / "step_00000001"), "--no-wandb"]) == 2
    (line,) = stderr_lines(capsys.readouterr().err)
    assert "no such directory" in line and not (tmp_path / "runs").exists()


def test_wait_for_dir_waits_for_the_run_to_appear(tmp_path, assets, caplog):
    staging, run = tmp_path / "staging", tmp_path / "run"
    sealed_ckpt(staging, 10, assets)

    def trainer_starts_later():  # once the watcher is waiting: the whole run appears at once
        deadline = time.time() + 60
        while time.time() < deadline and not any("to appear" in r.getMessage() for r in list(caplog.records)):
            time.sleep(0.05)
        time.sleep(0.3)  # a few of its polls find nothing
        os.rename(staging, run)

    t = threading.Thread(target=trainer_starts_later)
    caplog.set_level("INFO")
    t.start()
    try:
        rc = W.main(["--watch", str(run), "--wait-for-dir", "--once", "--every", "0.1s", "--no-wandb",
                     "--device", "cpu"])
    finally:
        t.join()
    assert rc == 0
    assert f"waiting for {run} to appear" in caplog.text
    assert (run / "eval" / "step_00000010.json").is_file()


# ------------------------------------------------------------------------------ 6. a checkpoint stays broken


@pytest.mark.parametrize("lost", ["config.yaml", "trainer_state.json"])
def test_a_checkpoint_missing_a_file_is_recorded_once(tmp_path, assets, caplog, lost):
    run = tmp_path / "run"
    d = sealed_ckpt(run, 10, assets)
    (d / lost).unlink()
    caplog.set_level("INFO")
    w = W.Watcher(str(run), wandb=False, device="cpu")
    w.source.recheck_s = 0.05
    assert w.run(once=True) == 1
    err = json.loads((run / "eval" / "step_00000010.error.json").read_text())
    assert err["error"].startswith(f"CheckpointError: {d} is not a usable checkpoint: {lost} is missing")
    assert "skipped" not in caplog.text and "disappeared" not in caplog.text and "waiting for" not in caplog.text
    caplog.clear()
    w2 = W.Watcher(str(run), wandb=False, device="cpu")
    assert w2.run(once=True) == 0
    assert w2.evaluated == [] and "skipped" not in caplog.text and "held back by earlier errors: step_00000010" \
        in caplog.text


def test_a_pruned_checkpoint_is_still_just_skipped(tmp_path, assets, caplog):
    run = tmp_path / "run"
    d = sealed_ckpt(run, 10, assets)
    w = W.Watcher(str(run), wandb=False, device="cpu")
    w.acquire()
    try:
        (ref,) = w.pending()
        real = w.source.snapshot

        def pruned_midway(ref, dest):  # the trainer's prune renames the directory away, then deletes it
            os.rename(d, run / "checkpoints" / ".tmp-delete-step_00000010-1")
            real(ref, dest)

        w.source.snapshot = pruned_midway
        caplog.set_level("WARNING")
        assert w.process(ref) is None
    finally:
        w.release()
    assert "step_00000010: skipped" in caplog.text
    assert not list((run / "eval").glob("step_00000010*"))


# ------------------------------------------------------------------------- 7. skipped metrics and shards


def test_a_skipped_metric_is_a_warning_saying_how_to_fix_it(tmp_path, assets, caplog):
    run = tmp_path / "run"
    sealed_ckpt(run, 10, assets, extra=["eval.metrics=[val_loss,rank,entropy,ner]", "eval.probe_text=null"])
    caplog.set_level("INFO")
    w = W.Watcher(str(run), wandb=False, device="cpu")
    assert w.run(once=True) == 0
    rec = json.loads((run / "eval" / "step_00000010.json").read_text())
    assert set(rec["skipped"]) == {"val_loss", "rank_activations", "rank_gradients", "entropy", "ner"}
    warned = {r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "skipped" in r.getMessage()}
    by_metric = {m: [x for x in warned if x.startswith(f"step_00000010: {m} skipped: ")]
                 for m in ("val_loss", "rank_activations and rank_gradients", "entropy", "ner")}
    assert all(len(v) == 1 for v in by_metric.values()), warned
    (val,) = by_metric["val_loss"]
    assert "manifest.json missing" in val and "--shards" in val and "eval.metrics" in val
    assert "eval.probe_text" in by_metric["entropy"][0] and "eval.ner.train" in by_metric["ner"][0]
    assert any(k.startswith("rank/weight/") for k in rec["metrics"])  # what needs no data is still computed


def test_a_bug_while_making_the_probe_batch_is_raised_not_skipped(tmp_path, assets, monkeypatch):
    """A missing probe file is refused up front, naming it; with the file there, an exception no input explains
    (here a TypeError) is a bug and stops the evaluation instead of turning into a "skipped" metric."""
    from metalm.eval import checkpoint_eval, valloss

    missing = sealed_ckpt(tmp_path / "run", 10, assets,
                          extra=["eval.metrics=[entropy]", f"eval.probe_text={tmp_path / 'missing.txt'}"])
    with pytest.raises(checkpoint_eval.InputError, match="missing.txt: no such file"):
        checkpoint_eval.evaluate_checkpoint(missing)

    probe = tmp_path / "probe.txt"
    probe.write_text("A sentence to probe the attention heads with.\nAnd a second one.\n")
    d = sealed_ckpt(tmp_path / "run2", 10, assets, extra=["eval.metrics=[entropy]", f"eval.probe_text={probe}"])

    def broken(*args, **kw):
        raise TypeError("a bug in the probe batch")

    monkeypatch.setattr(valloss, "probe_batch_from_text", broken)
    with pytest.raises(TypeError, match="a bug in the probe batch"):
        checkpoint_eval.evaluate_checkpoint(d)


class _FakeWandb:
    """Records wandb.init's arguments and what is logged; `fail_log` makes log() raise as an unreachable server."""

    def __init__(self, fail_log=False):
        self.inits, self.logged, self.fail_log = [], [], fail_log

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def define_metric(self, *a, **kw):
        pass

    def log(self, data, **kw):
        if self.fail_log:
            raise ConnectionError("connection reset")
        self.logged.append(data)

    def finish(self):
        pass


def test_evaluator_wandb_respects_wandb_mode_and_never_stops_evaluation(tmp_path, assets, monkeypatch, console):
    import wandb

    run = tmp_path / "run"
    sealed_ckpt(run, 10, assets, extra=["eval.metrics=[rank]", "logging.wandb=true"])
    sealed_ckpt(run, 20, assets, extra=["eval.metrics=[rank]", "logging.wandb=true"])
    fake = _FakeWandb()
    monkeypatch.setattr(wandb, "init", fake.init)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    w = W.Watcher(str(run), wandb=True, device="cpu")
    assert w.run(once=True) == 0
    assert [kw["mode"] for kw in fake.inits] == ["disabled"]  # once, in the mode the user asked for
    assert [r["eval/step"] for r in fake.logged] == [10, 20]

    failing = _FakeWandb(fail_log=True)
    monkeypatch.setattr(wandb, "init", failing.init)
    monkeypatch.delenv("WANDB_MODE")
    results = tmp_path / "again"
    w = W.Watcher(str(run), results=str(results), wandb=True, device="cpu")
    assert w.run(once=True) == 0
    assert [kw["mode"] for kw in failing.inits] == ["online"]  # WANDB_API_KEY set, no WANDB_MODE
    assert sorted(p.name for p in results.glob("step_*.json")) == ["step_00000010.json", "step_00000020.json"]
    warned = [ln for ln in console.readouterr().err.splitlines() if "W&B" in ln]
    assert warned == [f"metalm: warning: W&B logging failed (ConnectionError: connection reset); results go on "
                      f"being written to {results}"]


def test_relative_shards_fall_back_to_the_trainer_state(tmp_path, assets, toy_shards, caplog, monkeypatch):
    run = tmp_path / "run"
    d = make_ckpt(run, 10, assets, complete=False, extra=["data.shards=data/shards"])  # relative to the trainer
    state = json.loads((d / "trainer_state.json").read_text())
    (d / "trainer_state.json").write_text(json.dumps({**state, "data_shards": str(toy_shards)}))
    seal(d, 10)
    monkeypatch.chdir(tmp_path)  # data/shards does not exist from here
    caplog.set_level("INFO")
    w = W.Watcher(str(run), wandb=False, device="cpu")
    assert w.run(once=True) == 0
    rec = json.loads((run / "eval" / "step_00000010.json").read_text())
    assert "val_loss" not in rec["skipped"] and rec["metrics"]["val_tokens"] > 0
    assert rec["details"]["shards"] == {"path": str(toy_shards), "from": "trainer_state.json"}
    assert rec["details"]["probe"]["source"] == "val"
    assert f"using the run's shards {toy_shards}" in caplog.text


def test_shards_option_overrides_the_config(tmp_path, assets, toy_shards, capsys):
    run = tmp_path / "run"
    sealed_ckpt(run, 10, assets)  # data.shards names a directory that does not exist
    args = ["--watch", str(run), "--once", "--no-wandb", "--device", "cpu"]
    assert W.main(args + ["--shards", str(tmp_path / "nowhere")]) == 2
    (line,) = stderr_lines(capsys.readouterr().err)
    assert line.startswith(f"metalm-evaluate: --shards {tmp_path / 'nowhere'}: no manifest.json"), line
    assert not (run / "eval").exists()
    assert W.main(args + ["--shards", str(toy_shards)]) == 0
    rec = json.loads((run / "eval" / "step_00000010.json").read_text())
    assert rec["metrics"]["val_tokens"] > 0 and rec["details"]["shards"] == {"path": str(toy_shards),
                                                                             "from": "--shards"}


def test_an_override_that_only_this_checkpoint_rejects_writes_no_error_file(tmp_path, assets, caplog):
    """model.n_heads=12 is valid for the default config (d_model 96) but not for this one (d_model 32): the
    overrides are at fault, so the checkpoint is not held back by an error file."""
    run = tmp_path / "run"
    d = sealed_ckpt(run, 10, assets)
    caplog.set_level("INFO")
    w = W.Watcher(str(run), overrides=["model.n_heads=12"], wandb=False, device="cpu", every=0.05)
    assert w.run(once=True) == 1
    assert not list((run / "eval").glob("step_00000010*"))
    (msg,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert msg.startswith(f"step_00000010: not evaluated: the --config overrides do not apply to {d}: ")
    assert "correct --config and restart" in msg and ".snapshots" not in msg
    assert w.pending() == []  # this process does not retry it
    w2 = W.Watcher(str(run), wandb=False, device="cpu")
    assert w2.run(once=True) == 0 and w2.evaluated == ["step_00000010"]


def test_fsspec_source_missing_dir_and_missing_file(tmp_path, assets, capsys):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    res = tmp_path / "res"
    assert W.main(["--watch", "memory://evtest-missing/run", "--results", str(res), "--once", "--no-wandb",
                   "--device", "cpu"]) == 2
    (line,) = stderr_lines(capsys.readouterr().err)
    assert line.startswith("metalm-evaluate: --watch memory://evtest-missing/run: no such directory") and \
        not res.exists()
    local = tmp_path / "local"
    sealed_ckpt(local, 10, assets)
    (local / "checkpoints" / "step_00000010" / "config.yaml").unlink()
    for f in local.rglob("*"):
        if f.is_file():
            fs.pipe(f"/evtest-broken/run/{f.relative_to(local).as_posix()}", f.read_bytes())
    try:
        w = W.Watcher("memory://evtest-broken/run", results=str(res), wandb=False, device="cpu")
        w.source.recheck_s = 0.05
        assert w.run(once=True) == 1
        err = json.loads((res / "step_00000010.error.json").read_text())["error"]
        assert "/evtest-broken/run/checkpoints/step_00000010 is not a usable checkpoint: config.yaml is missing" \
            in err
        w2 = W.Watcher("memory://evtest-broken/run", results=str(res), wandb=False, device="cpu")
        assert w2.run(once=True) == 0 and w2.pending() == [] and [n for n, _ in w2.held_back] == ["step_00000010"]
    finally:
        fs.rm("/evtest-broken", recursive=True)


def _toy_iob2(path: Path) -> Path:
    sents = [(["Ann", "met", "Bob"], ["B-PER", "O", "B-PER"]),
             (["Paris", "is", "in", "France"], ["B-LOC", "O", "O", "B-LOC"])]
    path.write_text("".join("".join(f"{i + 1}\t{w}\t{t}\n" for i, (w, t) in enumerate(zip(ws, ts))) + "\n"
                            for ws, ts in sents * 2))
    return path


NER_FAST = ["eval.ner.epochs=1", "eval.ner.batch_size=4"]


def test_a_metric_that_fails_keeps_the_others_and_checkpoint_retries_it(tmp_path, assets, caplog):
    """NER on a malformed file fails after rank and entropy were computed: they are kept in the error file, and
    --checkpoint with a corrected file evaluates it again (it used to print "already evaluated" and exit 0)."""
    run = tmp_path / "run"
    ck = sealed_ckpt(run, 10, assets)
    bad = tmp_path / "bad.iob2"
    bad.write_text("1\tAnn\tB-PER\n2\tmet\n\n")  # a token line without its tag column
    good = _toy_iob2(tmp_path / "good.iob2")
    caplog.set_level("INFO")
    args = ["--checkpoint", str(ck), "--no-wandb", "--config", "eval.metrics=[rank,entropy]", *NER_FAST]
    assert W.main([*args, f"eval.ner.train={bad}", f"eval.ner.test={good}"]) == 1
    err = json.loads((run / "eval" / "step_00000010.error.json").read_text())
    assert set(err["failed"]) == {"ner"} and "bad.iob2" in err["failed"]["ner"]
    assert any(k.startswith("rank/weight/") for k in err["metrics"]) and "entropy/norm_mean" in err["metrics"]
    assert not (run / "eval" / "step_00000010.json").exists()
    (msg,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "kept in" in r.getMessage()]
    assert "\n" not in msg and "entropy, rank" in msg
    caplog.clear()
    assert W.main([*args, f"eval.ner.train={good}", f"eval.ner.test={good}"]) == 0
    assert "already evaluated" not in caplog.text and "the last evaluation failed" in caplog.text
    rec = json.loads((run / "eval" / "step_00000010.json").read_text())
    assert "ner/f1" in rec["metrics"] and "entropy/norm_mean" in rec["metrics"] and rec["failed"] == {}
    assert not (run / "eval" / "step_00000010.error.json").exists()
    assert [r["step"] for r in jsonl(run / "eval" / "eval.jsonl")] == [10]


def test_missing_ner_files_are_one_line_before_any_work(tmp_path, assets, capsys, caplog):
    """The README's old example named NER files that do not exist: refused up front (an override), or before the
    model is loaded (a checkpoint's own config), without an error file holding the checkpoint back."""
    run = tmp_path / "run"
    ck = sealed_ckpt(run, 10, assets)
    code = W.main(["--checkpoint", str(ck), "--no-wandb", "--config", "eval.ner.train=ja-train.iob2",
                   "eval.ner.test=ja-test.iob2"])
    lines = stderr_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and not (run / "eval").exists()
    assert lines[0].startswith("metalm-evaluate: --config eval.ner.train=ja-train.iob2: no such file (expected an "
                               "IOB2 file") and "eval.ner.test=ja-test.iob2: no such file" in lines[0]
    run2 = tmp_path / "run2"
    gone = f"{tmp_path}/gone.iob2"
    ck2 = sealed_ckpt(run2, 20, assets, extra=[f"eval.ner.train={gone}", f"eval.ner.test={gone}"])
    caplog.set_level("INFO")
    assert W.main(["--checkpoint", str(ck2), "--no-wandb"]) == 1
    (msg,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"eval.ner.train={tmp_path}/gone.iob2: no such file" in msg and "\n" not in msg
    assert not list((run2 / "eval").glob("step_00000020*"))


def test_checkpoint_after_a_failed_evaluation_evaluates_it_again(tmp_path, assets, caplog):
    """Only an error file from an earlier failure: --checkpoint is not "already evaluated", it evaluates."""
    run = tmp_path / "run"
    ck = sealed_ckpt(run, 10, assets)
    (run / "eval").mkdir()
    (run / "eval" / "step_00000010.error.json").write_text(json.dumps({"checkpoint": "step_00000010", "error": "x"}))
    caplog.set_level("INFO")
    assert W.main(["--checkpoint", str(ck), "--no-wandb", "--config", "eval.metrics=[entropy]"]) == 0
    assert "already evaluated" not in caplog.text
    assert "entropy/norm_mean" in json.loads((run / "eval" / "step_00000010.json").read_text())["metrics"]
    caplog.clear()
    assert W.main(["--checkpoint", str(ck), "--no-wandb"]) == 0 and "already evaluated" in caplog.text


def test_the_evaluator_prints_its_own_lines_only(tmp_path, assets):
    """With W&B on (offline), no W&B banner or run summary; other libraries' INFO lines (boto on s3://) are off
    while metalm's stay at --log-level."""
    run = tmp_path / "run"
    ck = sealed_ckpt(run, 10, assets, extra=["logging.wandb=true"])
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env.update(WANDB_MODE="offline", PYTHONPATH=str(REPO))
    code = ("import logging, sys; from metalm.eval.watcher import main; "
            "rc = main(sys.argv[1:]); logging.getLogger('botocore.credentials').info('Found credentials'); "
            "logging.getLogger('metalm.eval.x').info('metalm info line'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(ck), "--device", "cpu", "--config",
                          "eval.metrics=[entropy]"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert (run / "eval" / "step_00000010.json").is_file() and list((run / "eval" / "wandb").glob("offline-run-*"))
    assert "wandb" not in (out.stdout + out.stderr).lower().replace(str(run / "eval" / "wandb").lower(), "")
    assert "Found credentials" not in out.stderr and "metalm info line" in out.stderr
