"""Buckets end to end, against a real S3-compatible server (moto's, on 127.0.0.1; see s3server.py): prepare to the
bucket, train 2 processes from it and checkpoint to it, kill -9 and resume on a fresh machine from the bucket with
bit-identical losses, the evaluator watching the bucket; dropped connections, the shard cache, https:// shards
from a local server thread, pipe: shards, the uploader's order, retries and failures."""
from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from functools import partial
from itertools import islice
from pathlib import Path

import pytest
from procs import cpu_run_env, free_port
from s3server import DropProxy, s3_server  # noqa: F401 - the fixture

from metalm import checkpoint as ckpt
from metalm.data import DataError, ShardLoader, load_manifest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"
SEQ = 64
COMMON = [  # tests/test_train.py's tiny run
    "--config", str(REPO / "configs" / "cpu-tiny.yaml"),
    f"train.seq_len={SEQ}", f"model.max_seq_len={SEQ}", "train.micro_batch=4", "train.global_batch=16",
    "model.n_layers=2", "train.log_every=1", "train.val_every=0", "optim.warmup_steps=3",
    "logging.wandb=false", "logging.progress=false", "data.prepare_if_missing=false",
    "meta.n_way=4", "meta.k_shot=2", "meta.q_queries=2", "meta.inner_steps=3", "meta.hybrid_ratio=0.5",
]


def _take(ld, n: int) -> list:
    it = iter(ld)
    try:
        return [b.tolist() for b in islice(it, n)]
    finally:
        it.close()


@pytest.fixture(scope="module")
def bucket(s3_server, shared_data, tmp_path_factory):  # noqa: F811
    """A bucket with 400 documents of the real corpus under docs/ and shards prepared from them by the CLI under
    shards/ (the settings of conftest's `shards`: the bytes must come out identical)."""
    import fsspec

    name = s3_server.bucket()
    src = tmp_path_factory.mktemp("docs") / "slice.jsonl"
    with open(shared_data / "corpus" / "wiki-vital-en-fr-es.jsonl") as f:
        src.write_text("".join(islice(f, 400)))
    fsspec.filesystem("s3").put_file(str(src), f"{name}/docs/slice.jsonl")
    return name


def _prepare_cli(bucket: str, shared_data: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metalm.data.prepare", "--source", f"s3://{bucket}/docs/*.jsonl",
                           "--tokenizer", str(shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"),
                           "--out", f"s3://{bucket}/shards", "--seq-len", str(SEQ), "--val-fraction", "0.05",
                           "--samples-per-shard", "256", "--num-proc", "1", "--seed", "0", "--no-progress"],
                          cwd=cwd, env=cpu_run_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bucket_shards(bucket, shared_data, tmp_path_factory) -> str:
    out = _prepare_cli(bucket, shared_data, tmp_path_factory.mktemp("cwd"))
    assert out.returncode == 0, out.stderr[-3000:]
    return f"s3://{bucket}/shards"


# ------------------------------------------------------------------------------------------------ prepare


def test_prepare_reads_the_bucket_and_writes_the_same_shards_to_it(bucket, bucket_shards, shards, shared_data,
                                                                    tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    remote, local = load_manifest(bucket_shards), load_manifest(shards)
    assert remote["splits"] == local["splits"]  # same records, sizes and sha256s: byte-identical shards
    assert remote["source"]["files"] == [{"path": f"s3://{bucket}/docs/slice.jsonl",
                                          "bytes": fs.size(f"{bucket}/docs/slice.jsonl"), "kind": "jsonl"}]
    names = {p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/shards")}
    assert {"manifest.json", "tokenizer.json", "prepare.json", "shard-000000.tar", "shard-000000.json"} <= names
    assert not any(".tmp" in n for n in names)
    # a second run finds it complete and writes nothing; from another directory, nothing local is created
    again = _prepare_cli(bucket, shared_data, tmp_path)
    assert again.returncode == 0 and list(tmp_path.iterdir()) == []
    # the loader streams it: the same batches as from the local copy, resume state included
    a = ShardLoader(bucket_shards, seq_len=SEQ, micro_batch=4, seed=3, rank=1, world_size=2, num_workers=2)
    b = ShardLoader(shards, seq_len=SEQ, micro_batch=4, seed=3, rank=1, world_size=2, num_workers=2)
    assert _take(a, 30) == _take(b, 30) and a.state_dict() == b.state_dict()
    assert [x.tolist() for x in ShardLoader(bucket_shards, split="val", seq_len=SEQ, micro_batch=8)] == \
        [x.tolist() for x in ShardLoader(shards, split="val", seq_len=SEQ, micro_batch=8)]


def test_a_missing_manifest_suggests_the_command_that_writes_the_bucket(bucket, tmp_path):
    from metalm.config import load_config
    from metalm.data import ensure_prepared

    cfg = load_config(overrides=[f"data.shards=s3://{bucket}/nothing-here", "data.prepare_if_missing=false",
                                 f"train.seq_len={SEQ}"])
    with pytest.raises(DataError, match=rf"data.shards=s3://{bucket}/nothing-here: no manifest.json; run "
                                        rf"metalm-prepare .* --out s3://{bucket}/nothing-here"):
        ensure_prepared(cfg.data, seq_len=SEQ, vocab_size=cfg.model.vocab_size, seed=0)


# ------------------------------------------------------------------------------------------------ loader


def test_a_dropped_connection_mid_download_is_retried(s3_server, bucket_shards, shards, caplog):  # noqa: F811
    bucket = bucket_shards.split("/")[2]
    rel = load_manifest(shards)["splits"]["train"]["shards"][1]["path"]
    want = _take(ShardLoader(shards, seq_len=SEQ, micro_batch=4, shuffle=False), 100)
    # more drops than s3fs's own retries: the loader's retry (with backoff) gets the shard
    s3_server.proxy.drop(f"GET /{bucket}/shards/{rel}", after_bytes=3000, times=8)
    before = len(s3_server.proxy.dropped)
    with caplog.at_level(logging.WARNING, logger="metalm.data"):
        got = _take(ShardLoader(bucket_shards, seq_len=SEQ, micro_batch=4, shuffle=False, retry_backoff_s=0.05),
                    100)
    assert got == want
    assert len(s3_server.proxy.dropped) - before == 8
    retries = [r.getMessage() for r in caplog.records if "download failed" in r.getMessage()]
    assert retries and all(f"shard {bucket_shards}/{rel}: download failed" in m for m in retries)
    # a shard that never comes through: a DataError naming it, after the retries
    s3_server.proxy.drop(f"GET /{bucket}/shards/{rel}", after_bytes=3000, times=1000)
    try:
        with pytest.raises(DataError, match=rf"shard {bucket_shards}/{rel}: download failed after 2 attempts"):
            _take(ShardLoader(bucket_shards, seq_len=SEQ, micro_batch=4, shuffle=False, retries=1,
                              retry_backoff_s=0.05, read_ahead=0), 100)
    finally:
        s3_server.proxy.rules.clear()


def test_the_cache_dir_serves_the_next_epoch_without_the_network(s3_server, bucket_shards, shards,  # noqa: F811
                                                                 tmp_path):
    bucket = bucket_shards.split("/")[2]
    ld = ShardLoader(bucket_shards, seq_len=SEQ, micro_batch=4, cache_dir=str(tmp_path / "cache"))
    epoch = _take(ld, len(ld) + 2)
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("shard-*.tar"))
    assert cached == sorted(Path(r["path"]).name for r in load_manifest(shards)["splits"]["train"]["shards"])
    s3_server.proxy.drop(f"GET /{bucket}/shards/train/", after_bytes=0, times=1000)  # no shard download works now
    try:
        again = ShardLoader(bucket_shards, seq_len=SEQ, micro_batch=4, cache_dir=str(tmp_path / "cache"), retries=0)
        assert _take(again, len(ld) + 2) == epoch
    finally:
        s3_server.proxy.rules.clear()
    # a cached copy that no longer matches the manifest is downloaded again
    victim = next((tmp_path / "cache").rglob("shard-000000.tar"))
    victim.write_bytes(b"garbage")
    assert _take(ShardLoader(bucket_shards, seq_len=SEQ, micro_batch=4, cache_dir=str(tmp_path / "cache")),
                 len(ld) + 2) == epoch
    assert victim.stat().st_size > 1000


def test_pipe_shards(shards, tmp_path):
    want = _take(ShardLoader(shards, seq_len=SEQ, micro_batch=4, num_workers=2), 20)
    for loc in (f"pipe:cat {shards}/{{}}", f"pipe:cat {shards}"):
        assert _take(ShardLoader(loc, seq_len=SEQ, micro_batch=4, num_workers=2), 20) == want
    with pytest.raises(DataError, match=r"pipe:cat /nonexistent/manifest.json: cannot read: .*exited with status 1"):
        ShardLoader("pipe:cat /nonexistent/{}", seq_len=SEQ, micro_batch=4)


def test_remote_shards_of_a_single_shard_split(shards, tmp_path):
    """A train split of one shard read through a remote store (a pipe:, so the reader downloads ahead): it used to
    look ahead for a second shard forever and hang before the first batch. Read in a thread with a deadline, so a
    hang fails the test; the batches must be the local reader's (which never looks ahead)."""
    import shutil

    from data_cases import rewrite_manifest

    one = tmp_path / "one"
    shutil.copytree(shards, one)
    n = load_manifest(shards)["splits"]["train"]["shards"][0]["samples"]
    rewrite_manifest(one, lambda man: man["splits"]["train"].update(shards=man["splits"]["train"]["shards"][:1],
                                                                    samples=n))
    steps = n // 4 * 2 + 3  # two epochs and a bit
    want = _take(ShardLoader(one, seq_len=SEQ, micro_batch=4, global_batch=8), steps)
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(_take(ShardLoader(
        f"pipe:cat {one}/{{}}", seq_len=SEQ, micro_batch=4, global_batch=8), steps)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the remote single-shard loader did not hand out its batches within 60 s"
    assert got == want


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (the client trusts it through SSL_CERT_FILE)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_https_shards_from_a_local_server_thread(shards, tmp_path):
    pytest.importorskip("aiohttp")
    crt, key = _self_signed(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(shards)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}"
    code = ("import json, sys; from itertools import islice; from metalm.data import ShardLoader\n"
            f"ld = ShardLoader({url!r}, seq_len={SEQ}, micro_batch=4, num_workers=1)\n"
            "it = iter(ld); print(json.dumps([next(it).tolist() for _ in range(20)]))\n")
    try:
        # a fresh interpreter: aiohttp reads the trusted certificates (SSL_CERT_FILE) when it is imported
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(cpu_run_env(), SSL_CERT_FILE=str(crt)),
                             capture_output=True, text=True, timeout=180)
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == _take(ShardLoader(shards, seq_len=SEQ, micro_batch=4, num_workers=1), 20)


# ------------------------------------------------------------------------------------------------ uploader


def _fake_checkpoint(root: Path, step: int, payload: bytes = b"w" * 1000) -> Path:
    tmp = root / f".tmp-{ckpt.step_dir_name(step)}"
    (tmp / "ds").mkdir(parents=True)
    (tmp / "ds" / "state.bin").write_bytes(payload)
    ckpt.write_state(tmp, ckpt.TrainerState(step=step))
    final = root / ckpt.step_dir_name(step)
    ckpt.finalize(tmp, final, root, 2, ckpt.record_files(tmp, ckpt.checkpoint_files(tmp), True), step)
    return final


def test_the_uploader_sends_the_marker_last_prunes_and_reports_failures(s3_server, tmp_path):  # noqa: F811
    from metalm.checkpoint import CheckpointStore
    from metalm.train.uploader import Uploader

    bucket = s3_server.bucket()
    url = f"s3://{bucket}/run/checkpoints"
    said, warned = [], []
    up = Uploader(CheckpointStore(url, retries=1, backoff=0.05), tmp_path / ".uploads", keep_last_k=2,
                  say=said.append, warn=warned.append)
    root = tmp_path / "checkpoints"
    root.mkdir()
    start = len(s3_server.proxy.requests)
    for step in (10, 20, 30):
        up.submit(_fake_checkpoint(root, step))
        assert up.drain() == {}
    remote = CheckpointStore(url)
    assert remote.completed() == ["step_00000020", "step_00000030"] and remote.latest() == "step_00000030"
    puts = [line.split()[1] for line in s3_server.proxy.requests[start:] if line.startswith("PUT")]
    mine = [p for p in puts if "step_00000030" in p or p.endswith("/latest")]
    assert mine[-2].endswith("step_00000030/COMPLETE") and mine[-1].endswith("/latest")
    assert sorted(p.split("step_00000030/", 1)[1] for p in mine if "step_00000030/" in p) == \
        ["COMPLETE", "ds/state.bin", "trainer_state.json"]  # each file once, the marker after the others
    assert len(said) == 3 and not warned and not list((tmp_path / ".uploads").iterdir())
    # download it on a "fresh machine": verified against its marker
    got = remote.download("step_00000030", tmp_path / "fresh", checksums=True)
    assert ckpt.find_latest(tmp_path / "fresh", verify=True) == got
    # a bucket that is not there: retried, reported, kept staged; once it exists, the next drain uploads it
    broken = Uploader(CheckpointStore(f"s3://{bucket}-missing/ckpts", retries=1, backoff=0.05),
                      tmp_path / ".uploads2", keep_last_k=2, say=said.append, warn=warned.append)
    broken.submit(root / "step_00000030")
    failed = broken.drain()
    assert list(failed) == ["step_00000030"] and (tmp_path / ".uploads2" / "step_00000030").is_dir()
    assert any("failed after 2 attempts" in w and "stays staged" in w for w in warned)
    assert any("upload_failed" in e for e in broken.take_events())
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(f"{bucket}-missing")
    assert broken.drain() == {} and CheckpointStore(f"s3://{bucket}-missing/ckpts").latest() == "step_00000030"
    # staged snapshots survive the local prune (hard links) and a new process queues them again
    _fake_checkpoint(root, 40)
    again = Uploader(CheckpointStore(url), tmp_path / ".uploads", keep_last_k=2, say=said.append,
                     warn=warned.append)
    again._stage(root / "step_00000040", "step_00000040")
    assert again.recover() == ["step_00000040"] and again.drain() == {}
    assert remote.completed() == ["step_00000030", "step_00000040"]


# ------------------------------------------------------------------------------------------------ training


def _train_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            str(LAUNCHER), *COMMON, *extra]


def _losses(run_dir: Path) -> dict[int, tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r.get("ar_loss"), r.get("meta_loss"), r.get("meta/query_acc")) for r in rows if "lr" in r}


@pytest.mark.slow
def test_train_from_the_bucket_kill_9_and_resume_on_a_fresh_machine(bucket, bucket_shards, tmp_path):
    """Two processes read the shards from the bucket and checkpoint to it (train.run_dir=s3://...); kill -9 mid-run;
    a second "machine" (an empty local directory) resumes from the bucket and logs exactly the losses of an
    uninterrupted run; an evaluator watching the bucket evaluates each checkpoint once."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    steps = ["train.max_steps=24", "checkpoint.every=6", "checkpoint.keep_last_k=2", f"data.shards={bucket_shards}"]
    full = tmp_path / "full"
    out = subprocess.run(_train_cmd(*steps, f"train.run_dir={full}", "checkpoint.every=100"), cwd=REPO,
                         env=cpu_run_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reference = _losses(full)
    assert sorted(reference) == list(range(1, 25))

    run_url = f"s3://{bucket}/runs/tiny"
    first = subprocess.Popen(_train_cmd(*steps, f"train.run_dir={run_url}", f"train.local_dir={tmp_path / 'm1'}"),
                             cwd=REPO, env=cpu_run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not fs.exists(f"{bucket}/runs/tiny/checkpoints/step_00000006/COMPLETE"):
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.1)
        assert first.poll() is None  # still training
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        log = first.communicate()[0].decode()
    assert "uploaded step_00000006" in log
    from metalm.checkpoint import CheckpointStore

    remote = CheckpointStore(f"{run_url}/checkpoints")
    resumed_from = remote.latest()
    assert resumed_from is not None and resumed_from < "step_00000024", resumed_from

    results = tmp_path / "eval"
    watcher = subprocess.Popen([sys.executable, str(REPO / "launchers" / "evaluate.py"), "--watch", run_url,
                                "--results", str(results), "--every", "1", "--no-wandb", "--device", "cpu", "--config",
                                "eval.metrics=[val_loss]", "eval.val_batches=2", "eval.batch_size=4",
                                f"eval.seq_len={SEQ}"], cwd=REPO, env=cpu_run_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        fresh = tmp_path / "m2"  # another machine: nothing local, everything from the bucket
        second = subprocess.run(_train_cmd(*steps, f"train.run_dir={run_url}", f"train.local_dir={fresh}"), cwd=REPO,
                                env=cpu_run_env(), capture_output=True, text=True, timeout=400)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert f"downloading checkpoint {resumed_from} from {run_url}/checkpoints" in second.stdout
        assert "resumed from" in second.stdout and "uploaded step_00000024" in second.stdout
        start = int(resumed_from[5:])
        got = _losses(fresh)
        assert sorted(got) == list(range(start + 1, 25))
        assert got == {s: reference[s] for s in got}  # bit-identical after the resume
        assert remote.completed() == ["step_00000018", "step_00000024"] and remote.latest() == "step_00000024"
        assert not (REPO / "s3:").exists() and not (tmp_path / "s3:").exists()
        # the watcher evaluates what is complete in the bucket, each checkpoint once
        deadline = time.monotonic() + 300
        while not all((results / f"{n}.json").is_file() for n in remote.completed()):
            assert watcher.poll() is None, watcher.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the watcher did not evaluate the bucket's checkpoints"
            time.sleep(0.5)
    finally:
        os.killpg(watcher.pid, signal.SIGTERM)
        wlog = watcher.communicate(timeout=60)[0].decode()
    lines = [json.loads(x) for x in (results / "eval.jsonl").read_text().splitlines()]
    names = [x["checkpoint"] for x in lines]
    assert len(names) == len(set(names)) and {"step_00000018", "step_00000024"} <= set(names), wlog[-3000:]
    assert all(x.get("val_loss") is not None for x in lines)
    again = subprocess.run([sys.executable, str(REPO / "launchers" / "evaluate.py"), "--watch", run_url, "--once",
                            "--results", str(results), "--no-wandb", "--device", "cpu", "--config",
                            "eval.metrics=[val_loss]", "eval.val_batches=2", "eval.batch_size=4",
                            f"eval.seq_len={SEQ}"],
                           cwd=REPO, env=cpu_run_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [json.loads(x)["checkpoint"] for x in (results / "eval.jsonl").read_text().splitlines()] == names


# ------------------------------------------------------------------------------------------ a stalled bucket


def _run_into_a_stalled_bucket(s3_server, shards, tmp_path, *extra: str):  # noqa: F811
    """A 1-process 2-step run that checkpoints to a bucket behind a proxy on 127.0.0.1, which turns into a black
    hole (accepts connections, never answers) once the run has used the bucket at start-up. Returns the process,
    its output lines with their arrival times, and the moment it started waiting for the uploads."""
    proxy = DropProxy(int(s3_server.direct.rsplit(":", 1)[1]))
    bucket = s3_server.bucket()
    run = tmp_path / "run"
    cmd = [sys.executable, str(LAUNCHER), *COMMON, f"data.shards={shards}", "train.max_steps=2", "checkpoint.every=2",
           f"train.run_dir={run}", f"checkpoint.remote=s3://{bucket}/ckpts", *extra]
    env = dict(cpu_run_env(), AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("metalm: model "):  # set up (bucket probed, resume looked for): now it goes silent
                proxy.stall()
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("waiting for the checkpoint uploads" in x for _, x in lines):
            assert proc.poll() is None, "".join(x for _, x in lines)[-3000:]
            assert time.monotonic() < deadline, "training did not reach its final save"
            time.sleep(0.05)
        waiting_since = next(t for t, x in lines if "waiting for the checkpoint uploads" in x)
        return proc, lines, waiting_since, reader, proxy
    except BaseException:
        proc.kill()
        proxy.close()
        raise


def _end(proc, reader, proxy, within: float) -> float:
    """Wait at most `within` seconds for the run to end (killed and failed otherwise); the moment it ended."""
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the run did not end within {within:.0f} s")
    finally:
        reader.join(timeout=10)
        proxy.close()
    return time.monotonic()


@pytest.mark.slow
def test_sigterm_ends_the_wait_for_a_stalled_bucket_within_seconds(s3_server, shards, tmp_path):  # noqa: F811
    """With the default timeouts (60 s a request, 4 retries, a 900 s drain), SIGTERM while the run waits for uploads
    to a bucket that never answers ends it within seconds, naming the checkpoint staged locally and not uploaded."""
    proc, lines, _, reader, proxy = _run_into_a_stalled_bucket(s3_server, shards, tmp_path)
    time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    ended = _end(proc, reader, proxy, within=30)
    out = "".join(x for _, x in lines)
    assert ended - sent < 10, out[-3000:]
    assert proc.returncode == 1, out[-3000:]
    assert "stopped by SIGTERM while waiting for the checkpoint uploads to s3://" in out, out[-3000:]
    assert f"not uploaded: step_00000002, complete in {tmp_path / 'run' / 'checkpoints'} and staged in " \
           f"{tmp_path / 'run' / '.uploads'}" in out, out[-3000:]
    assert (tmp_path / "run" / ".uploads" / "step_00000002" / ckpt.MARKER).is_file()


@pytest.mark.slow
def test_the_wait_for_a_stalled_bucket_ends_at_the_drain_deadline(s3_server, shards, tmp_path):  # noqa: F811
    """checkpoint.upload_drain_s bounds the end of a run against a bucket that never answers: the run ends with an
    error naming the staged checkpoint within a few seconds of the deadline after training."""
    proc, lines, waiting_since, reader, proxy = _run_into_a_stalled_bucket(s3_server, shards, tmp_path,
                                                                         "checkpoint.upload_drain_s=6")
    ended = _end(proc, reader, proxy, within=60)
    out = "".join(x for _, x in lines)
    assert 5 < ended - waiting_since < 6 + 10, (ended - waiting_since, out[-3000:])
    assert proc.returncode == 1, out[-3000:]
    assert "did not finish within checkpoint.upload_drain_s=6 s; not uploaded: step_00000002" in out, out[-3000:]
    assert (tmp_path / "run" / ".uploads" / "step_00000002" / ckpt.MARKER).is_file()
