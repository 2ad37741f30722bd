"""The asynchronous evaluator: exactly-once evaluation, incomplete/vanished checkpoints, crash + restart,
SIGTERM, fsspec sources, and the result files."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from metalm.eval import watcher as W
from metalm.checkpoint import MARKER
from eval_cases import jsonl, make_ckpt, np_er

REPO = Path(__file__).resolve().parents[1]


def test_each_complete_checkpoint_once_and_incomplete_waits(tmp_path, assets, caplog):
    run = tmp_path / "run"
    for s in (10, 20, 30):
        make_ckpt(run, s, assets)
    pending = make_ckpt(run, 40, assets, complete=False)
    (run / "checkpoints" / ".tmp-step_00000050").mkdir()  # a save in progress is never looked at
    w = W.Watcher(str(run), wandb=False, device="cpu")
    caplog.set_level("INFO")
    assert w.run(once=True) == 0
    assert w.evaluated == ["step_00000010", "step_00000020", "step_00000030"]
    assert "waiting for step_00000040" in caplog.text
    ev = run / "eval"
    assert sorted(p.name for p in ev.glob("step_*.json")) == [f"step_000000{s}.json" for s in (10, 20, 30)]
    rec = json.loads((ev / "step_00000020.json").read_text())
    assert rec["step"] == 20 and rec["tokens"] == 1280 and rec["checkpoint"] == "step_00000020"
    assert "val_loss" in rec["skipped"] and "manifest.json" in rec["skipped"]["val_loss"]
    # the paper aggregate, recomputed independently from the checkpoint's weights
    from safetensors.numpy import load_file

    wts = load_file(str(run / "checkpoints" / "step_00000020" / "model.safetensors"))
    ref = np.mean([np_er(wts[f"model.layers.{i}.self_attn.{k}.weight"]) for i in range(2) for k in "qkvo"
                   for k in [f"{k}_proj"]])
    assert rec["metrics"]["rank/weight/attn_mean_er"] == pytest.approx(ref, rel=1e-6)
    assert 0 < rec["metrics"]["entropy/norm_mean"] <= 1 and "rank/grad/attn_mean_er" in rec["metrics"]
    assert rec["details"]["probe"] == {"source": "probe_text", "shape": [2, 25]}

    w2 = W.Watcher(str(run / "checkpoints"), wandb=False, device="cpu")  # RUN/checkpoints works too
    w2.run(once=True)
    assert w2.evaluated == []
    (pending / MARKER).write_text("ok\n")
    w3 = W.Watcher(str(run), wandb=False, device="cpu")
    w3.run(once=True)
    assert w3.evaluated == ["step_00000040"]
    lines = jsonl(ev / "eval.jsonl")
    assert [r["checkpoint"] for r in lines] == [f"step_000000{s}" for s in (10, 20, 30, 40)]
    assert not list(ev.glob("*.inprogress")) and not list((ev / ".snapshots").iterdir())


def test_checkpoint_pruned_before_or_after_snapshot(tmp_path, assets, caplog):
    import shutil

    run = tmp_path / "run"
    a, b = make_ckpt(run, 10, assets), make_ckpt(run, 20, assets)
    w = W.Watcher(str(run), wandb=False, device="cpu")
    w.acquire()
    try:
        refs = w.pending()
        shutil.rmtree(a)  # pruned by keep_last_k between the scan and the snapshot
        caplog.set_level("WARNING")
        assert w.process(refs[0]) is None
        assert "skipped" in caplog.text and not (run / "eval" / "step_00000010.json").exists()
        real = w.source.snapshot

        def snapshot_then_prune(ref, dest):
            real(ref, dest)
            shutil.rmtree(b)  # pruned while being evaluated: the snapshot (hard links) still holds the files

        w.source.snapshot = snapshot_then_prune
        rec = w.process(refs[1])
        assert rec is not None and rec["step"] == 20
    finally:
        w.release()


def test_failed_evaluation_is_recorded_and_not_retried(tmp_path, assets):
    run = tmp_path / "run"
    d = make_ckpt(run, 10, assets)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    w = W.Watcher(str(run), wandb=False, device="cpu")
    w.run(once=True)
    err = json.loads((run / "eval" / "step_00000010.error.json").read_text())
    assert err["checkpoint"] == "step_00000010" and err["error"]
    assert not (run / "eval" / "step_00000010.json").exists()
    w2 = W.Watcher(str(run), wandb=False, device="cpu")
    assert w2.pending() == []


def test_lock_and_jsonl_reconciliation(tmp_path, assets):
    run = tmp_path / "run"
    for s in (10, 20):
        make_ckpt(run, s, assets)
    W.Watcher(str(run), wandb=False, device="cpu").run(once=True)
    ev = run / "eval"
    first = (ev / "eval.jsonl").read_text().splitlines()
    (ev / "eval.jsonl").write_text(first[0] + "\n" + first[1][:17])  # a torn append after a crash
    w = W.Watcher(str(run), wandb=False, device="cpu")
    w.acquire()
    try:
        assert [r["checkpoint"] for r in jsonl(ev / "eval.jsonl")] == ["step_00000010", "step_00000020"]
        other = W.Watcher(str(run), wandb=False, device="cpu")
        with pytest.raises(RuntimeError, match=rf"another evaluator holds .*\.lock \(host {socket.gethostname()}, "
                                               rf"pid {os.getpid()}, since \d{{4}}-\d\d-\d\d "):
            other.acquire()
    finally:
        w.release()


def test_fsspec_source_downloads_complete_checkpoints(tmp_path, assets):
    fsspec = pytest.importorskip("fsspec")
    local = tmp_path / "local"
    make_ckpt(local, 10, assets)
    make_ckpt(local, 20, assets, complete=False)
    fs = fsspec.filesystem("memory")
    for f in local.rglob("*"):
        if f.is_file():
            fs.pipe(f"/evtest/run/{f.relative_to(local).as_posix()}", f.read_bytes())
    try:
        with pytest.raises(ValueError, match="--results"):
            W.Watcher("memory://evtest/run", wandb=False)
        w = W.Watcher("memory://evtest/run", results=str(tmp_path / "res"), wandb=False, device="cpu")
        w.run(once=True)
        assert w.evaluated == ["step_00000010"]
        assert json.loads((tmp_path / "res" / "step_00000010.json").read_text())["source"].endswith("step_00000010")
    finally:
        fs.rm("/evtest", recursive=True)


def test_single_checkpoint_cli_with_ner(tmp_path, assets, caplog):
    """--checkpoint PATH with --config overrides: NER on toy IOB2 files through the real tokenizer path."""
    run = tmp_path / "run"
    ck = make_ckpt(run, 10, assets)
    sents = [(["Ann", "met", "Bob"], ["B-PER", "O", "B-PER"]),
             (["Paris", "is", "in", "France"], ["B-LOC", "O", "O", "B-LOC"])]
    text = "".join("".join(f"{i + 1}\t{w}\t{t}\n" for i, (w, t) in enumerate(zip(ws, ts))) + "\n"
                   for ws, ts in sents * 4)
    (tmp_path / "toy.iob2").write_text(text)
    args = ["--checkpoint", str(ck), "--no-wandb",
            "--config", "eval.metrics=[ner]", f"eval.ner.train={tmp_path}/toy.iob2",
            f"eval.ner.test={tmp_path}/toy.iob2", "eval.ner.mode=full", "eval.ner.lr=1e-2", "eval.ner.epochs=3",
            "eval.ner.batch_size=4", "eval.ner.log_every=1"]
    assert W.main(args) == 0  # in-process: the CLI path without another interpreter start-up
    rec = json.loads((run / "eval" / "step_00000010.json").read_text())
    assert set(rec["metrics"]) >= {"ner/f1", "ner/PER/f1", "ner/LOC/f1", "ner/t90", "ner/auc"}
    assert rec["details"]["ner"]["steps"] == 6 and rec["details"]["ner"]["test"]["n_sentences"] == 8
    caplog.set_level("INFO")
    assert W.main(args) == 0 and "already evaluated" in caplog.text
    assert W.main(["--checkpoint", str(ck), "--config", "eval.ner.mode=bogus"]) == 2  # bad override: fail fast


def _wait_for(pred, timeout, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(0.005)
    return False


@pytest.mark.slow
def test_sigkill_mid_evaluation_then_restart_and_sigterm(tmp_path, assets):
    run = tmp_path / "run"
    for s in (10, 20, 30):
        make_ckpt(run, s, assets)
    ev = run / "eval"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "launchers" / "evaluate.py"), "--watch", str(run), "--every", "0.2s",
           "--no-wandb"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        assert _wait_for(lambda: (ev / "step_00000020.inprogress").exists(), 90, proc), proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = (ev / "step_00000010.json").read_text()
    # an evaluation (load, SVDs, attention) takes far longer than the 5 ms polling: the kill lands inside it
    assert not (ev / "step_00000020.json").exists()

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        assert _wait_for(lambda: (ev / "step_00000030.json").exists(), 90, proc)
        time.sleep(0.3)  # let it go back to polling
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        log = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log
    assert "stopping" in log
    assert (ev / "step_00000010.json").read_text() == first  # never re-evaluated
    assert "evaluating step_00000010" not in log
    assert "interrupted" in log and "evaluating step_00000020" in log
    assert [r["checkpoint"] for r in jsonl(ev / "eval.jsonl")] == ["step_00000010", "step_00000020", "step_00000030"]
    assert not list(ev.glob("*.inprogress"))


@pytest.mark.slow
def test_watcher_beside_a_real_training_run(tmp_path, shared_data):
    """launchers/pretrain.py writes checkpoints while the watcher polls: each one is evaluated exactly once,
    including val_loss on the run's real validation shards."""
    from metalm.data.prepare import prepare

    src = tmp_path / "slice.jsonl"
    with open(shared_data / "corpus" / "wiki-vital-en-fr-es.jsonl") as f:
        src.write_text("".join(line for _, line in zip(range(200), f)))
    tok = shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"
    prepare(str(src), str(tok), str(tmp_path / "shards"), 64, val_fraction=0.05, samples_per_shard=256, num_proc=1,
            text_field="text", seed=0)
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launchers" / "pretrain.py"), "--config", str(REPO / "configs" / "cpu-tiny.yaml"),
           "train.seq_len=64", "model.max_seq_len=64", "train.micro_batch=4", "train.global_batch=4",
           "model.n_layers=2", "train.max_steps=6", "train.log_every=1", "train.val_every=0", "optim.warmup_steps=2",
           "checkpoint.every=2", "checkpoint.keep_last_k=10", "logging.wandb=false", "logging.progress=false",
           "data.prepare_if_missing=false", "meta.n_way=4", "meta.k_shot=2", "meta.q_queries=2",
           "meta.inner_steps=3", f"data.shards={tmp_path / 'shards'}", f"train.run_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    env.pop("TRITON_INTERPRET", None)
    trainer = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    w = W.Watcher(str(run), wandb=False, device="cpu", every=0.1)  # the run dir does not exist yet
    w.acquire()
    during = []
    try:
        while trainer.poll() is None:
            w.poll()
            during = list(w.evaluated)
            time.sleep(0.1)
        w.poll()
        out = trainer.stdout.read().decode()
    finally:
        w.release()
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 0, out[-3000:]
    names = [f"step_{s:08d}" for s in (2, 4, 6)]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == names
    assert w.evaluated == names and during, "nothing was evaluated while training ran"
    lines = jsonl(run / "eval" / "eval.jsonl")
    assert [r["checkpoint"] for r in lines] == names
    assert all("val_loss" in r and r["val_tokens"] > 0 for r in lines)
    assert [r["tokens"] for r in lines] == [json.loads((run / "checkpoints" / n / "trainer_state.json").read_text())
                                            ["tokens"] for n in names]


@pytest.mark.parametrize("form", ["run", "checkpoints", "latest"])
def test_checkpoint_option_takes_a_run_its_checkpoints_or_latest(tmp_path, assets, form, capsys):
    """--checkpoint given a run directory, its checkpoints/ directory or its `latest` pointer evaluates the checkpoint
    `latest` names (complete), not a newer incomplete one; with no complete checkpoint there, a one-line refusal."""
    run = tmp_path / "run"
    for step in (10, 20):
        make_ckpt(run, step, assets)
    make_ckpt(run, 30, assets, complete=False)  # an interrupted save, newer than `latest`
    (run / "checkpoints" / "latest").write_text("step_00000020\n")
    given = {"run": run, "checkpoints": run / "checkpoints", "latest": run / "checkpoints" / "latest"}[form]
    args = ["--no-wandb", "--device", "cpu", "--config", "eval.metrics=[entropy]"]
    assert W.main(["--checkpoint", str(given), *args]) == 0
    assert [r["checkpoint"] for r in jsonl(run / "eval" / "eval.jsonl")] == ["step_00000020"]
    empty = tmp_path / "empty"
    make_ckpt(empty, 10, assets, complete=False)
    assert W.main(["--checkpoint", str({"run": empty, "checkpoints": empty / "checkpoints",
                                        "latest": empty / "checkpoints" / "latest"}[form]), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("metalm-evaluate: --checkpoint ") and \
        f"no complete checkpoint in {empty / 'checkpoints'} (1 step directories, none with a COMPLETE marker" in err


def test_shards_at_any_location_the_trainer_reads_are_taken_as_given(tmp_path):
    """--shards takes what data.shards takes: a URL or a pipe: command as given (one URL test, metalm.storage), a
    local directory only with its manifest.json."""
    for location in ("pipe:cat /data/shards/{}", "s3://bucket/shards", "hf://datasets/org/shards"):
        assert W.check_shards(location) == location
    with pytest.raises(W.UsageError, match="no manifest.json there"):
        W.check_shards(str(tmp_path))
