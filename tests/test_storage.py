"""The storage layer (metalm.storage): local paths, file://, fsspec URLs (a real S3-compatible server, moto, on
127.0.0.1) and pipe:; a URL is never a local directory; a scheme without its package names the package."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3server import FAKE_KEYS, DropProxy, s3_server  # noqa: F401 - the fixture

from metalm import storage
from metalm.storage import StorageError, open_store

REPO = Path(__file__).resolve().parents[1]


def test_names_of_locations():
    assert storage.scheme("s3://b/x") == "s3" and storage.scheme("GS://b") == "gs"
    assert storage.scheme("/data/x") == "" and storage.scheme("file:///data/x") == "" and storage.scheme("x") == ""
    assert storage.scheme("pipe:cat /x/{}") == "pipe" and storage.is_url("pipe:cat x")
    assert storage.local_path("file:///data/x") == Path("/data/x")
    with pytest.raises(ValueError):
        storage.local_path("s3://b/x")
    assert storage.join("s3://b/x/", "train", "a.tar") == "s3://b/x/train/a.tar"
    assert storage.join("/d", "train/a.tar") == "/d/train/a.tar"
    assert storage.join("pipe:cat /d/{}", "train") == "pipe:cat /d/train/{}"
    assert storage.absolute("s3://b/x") == "s3://b/x" and storage.absolute("rel") == str(Path("rel").resolve())


def test_inline_credentials_and_writes_to_read_only_schemes_are_refused():
    with pytest.raises(StorageError) as e:
        storage.check_location("s3://AKIAXXX:s3cr3t@bucket/x", "data.shards")
    assert "s3cr3t" not in str(e.value) and "inline credentials" in str(e.value)
    for loc in ("https://host/x", "http://host/x", "pipe:cat x"):
        with pytest.raises(StorageError, match="read-only"):
            storage.check_location(loc, "checkpoint.remote", writable=True)
        storage.check_location(loc, "data.shards")  # reading is fine
    with pytest.raises(StorageError, match="read-only"):
        open_store("https://127.0.0.1:9/x").write_bytes("a", b"x")


def test_a_scheme_without_its_package_names_the_package(tmp_path):
    try:  # gcsfs is not part of the test extra
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    with pytest.raises(StorageError) as e:
        open_store("gs://bucket/shards")
    assert str(e.value) == ("gs://bucket/shards: the gs:// scheme needs the package gcsfs, which is not installed "
                            "(pip install gcsfs or pip install 'metalm[gcs]')")
    with pytest.raises(StorageError, match="unknown URL scheme nosuch://"):
        open_store("nosuch://bucket/x")


def test_the_cli_never_turns_a_url_into_a_local_directory(tmp_path, shared_data):
    """The trap of the issue: `--out s3://...` (or gs://) must write to the bucket or fail, never create ./s3:/..."""
    src = tmp_path / "docs.jsonl"
    with open(shared_data / "corpus" / "wiki-vital-en-fr-es.jsonl") as f:
        src.write_text("".join(next(f) for _ in range(20)))
    out = subprocess.run([sys.executable, "-m", "metalm.data.prepare", "--source", str(src), "--tokenizer",
                          str(shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"), "--out",
                          "gs://bucket/shards", "--seq-len", "32", "--no-progress"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "the gs:// scheme needs the package gcsfs" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no ./gs:/bucket/shards


def test_local_store_writes_atomically(tmp_path):
    st = open_store(f"file://{tmp_path}")
    assert st.local and st.path("a") == tmp_path / "a"
    st.write_bytes("sub/a.bin", b"x" * 10)
    src = tmp_path / "src.bin"
    src.write_bytes(b"y" * 5)
    st.put_file("sub/b.bin", src)
    assert st.read_bytes("sub/a.bin") == b"x" * 10 and st.size("sub/b.bin") == 5
    assert st.list("sub") == ["a.bin", "b.bin"]
    st.get_file("sub/b.bin", tmp_path / "c.bin")
    assert (tmp_path / "c.bin").read_bytes() == b"y" * 5
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    st.remove("sub", recursive=True)
    assert not st.exists("sub") and st.list("sub") == []


def test_s3_store_on_the_local_server(s3_server):  # noqa: F811
    bucket = s3_server.bucket()
    st = open_store(f"s3://{bucket}/root")
    assert not st.local and st.list() == []
    st.write_bytes("a/x.bin", b"1" * 100)
    src = Path(os.environ.get("TMPDIR", "/tmp")) / f"metalm-store-{os.getpid()}.bin"
    src.write_bytes(os.urandom(7 << 20))  # above s3fs's multipart threshold: published only when complete
    try:
        st.put_file("a/big.bin", src)
        assert st.size("a/big.bin") == 7 << 20 and st.read_bytes("a/big.bin") == src.read_bytes()
    finally:
        src.unlink()
    assert st.list() == ["a"] and st.list("a") == ["big.bin", "x.bin"] and st.exists("a/x.bin")
    with pytest.raises(FileNotFoundError):
        st.read_bytes("a/missing")
    st.remove("a", recursive=True)
    assert st.list() == [] and not st.exists("a/x.bin")
    # listings are not cached: what another client writes shows at once (a watcher polls like this)
    other = open_store(f"s3://{bucket}/root")
    st.list()
    other.write_bytes("new/y", b"y")
    assert st.list() == ["new"]


def test_pipe_store_reads_command_output(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a b.txt").write_bytes(b"hello")
    for loc in (f"pipe:cat {tmp_path}/{{}}", f"pipe:cat {tmp_path}"):
        st = open_store(loc)
        assert st.read_bytes("train/a b.txt") == b"hello"  # the path is shell-quoted
        assert st.exists("train/a b.txt") and not st.exists("train/missing")
    with pytest.raises(StorageError, match=r"exited with status 1"):
        open_store(f"pipe:cat {tmp_path}/{{}}").read_bytes("missing")
    with pytest.raises(StorageError, match="read-only"):
        open_store(f"pipe:cat {tmp_path}/{{}}").write_bytes("x", b"")


def test_retry_backs_off_then_gives_up():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("dropped")
        return "ok"

    assert storage.retry(flaky, attempts=3, what="x", backoff=0.5, sleep=waits.append) == "ok"
    assert waits == [0.5, 1.0]
    calls.clear()
    with pytest.raises(ConnectionError):
        storage.retry(flaky, attempts=2, what="x", sleep=waits.append)
    with pytest.raises(FileNotFoundError):  # not worth retrying: raised at once
        storage.retry(lambda: (_ for _ in ()).throw(FileNotFoundError("x")), attempts=5, what="x",
                      give_up_on=(FileNotFoundError,), sleep=lambda s: pytest.fail("slept"))


def test_cache_path_is_per_location():
    a = storage.cache_path("/c", "s3://b/shards", "train/shard-000000.tar")
    b = storage.cache_path("/c", "s3://b/other", "train/shard-000000.tar")
    assert a != b and a.parent.parent.parent == Path("/c") and a.name == "shard-000000.tar"
    assert "s3:" not in str(a)


def test_a_black_holed_s3_endpoint_fails_each_request_once_after_the_timeout(tmp_path, monkeypatch):
    """An endpoint that accepts connections and never answers (a listener on 127.0.0.1 started and stopped here):
    with Limits(timeout_s=1, attempts=1) every operation, uploads included, fails after about a second with one
    request sent, instead of botocore's and s3fs's retries multiplying, or an upload waiting for ever for the
    server's "100 Continue"."""
    pytest.importorskip("s3fs")
    hole = DropProxy(None)
    try:
        for key, value in {**FAKE_KEYS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{hole.port}"}.items():
            monkeypatch.setenv(key, value)
        store = open_store("s3://bucket/ckpts", storage.Limits(timeout_s=1, attempts=1))
        src = tmp_path / "state.bin"
        src.write_bytes(b"w" * 5000)
        ops = {"write_bytes": lambda: store.write_bytes("a", b"data"), "put_file": lambda: store.put_file("b", src),
               "read_bytes": lambda: store.read_bytes("a"), "list": store.list}
        for name, op in ops.items():
            before, t0 = len(hole.requests), time.monotonic()
            with pytest.raises(OSError, match="Read timeout on endpoint URL"):
                op()
            took = time.monotonic() - t0
            assert 0.9 < took < 5, (name, took)
            assert len(hole.requests) == before + 1, (name, hole.requests[before:])
    finally:
        hole.close()
