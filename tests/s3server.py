"""A real S3-compatible server for the tests: moto's standalone server (pip moto[server]) on 127.0.0.1, started
and stopped by a session fixture, plus a TCP proxy in front of it that can drop a connection mid-response.

Clients find it the way a user's would find their own S3-compatible store: through the environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), which subprocesses inherit.
The keys are fake: moto accepts any.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "AKIATESTMOTOFAKEKEY01", "AWS_SECRET_ACCESS_KEY": "moto/fake/secret/0123456789abcdef",
             "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


class DropProxy:
    """A TCP proxy to the server. `drop(substring, after_bytes, times)`: the next `times` requests whose first
    line contains `substring` get only `after_bytes` bytes of their response, then the connection is closed
    (what a flaky network does mid-download). Counts the requests it cut in `dropped`.

    `stall()` turns it into a black hole: from then on every connection, new or open, is kept open and its
    requests are read and never answered (a stalled endpoint); with upstream_port=None it is one from the start.
    `close()` closes the listener and every connection."""

    def __init__(self, upstream_port: int | None):
        self.upstream = upstream_port
        self.stalled = upstream_port is None
        self.clients: list[socket.socket] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.rules: list[list] = []  # [substring, after_bytes, times left]
        self.dropped: list[str] = []
        self.requests: list[str] = []  # the first line of every request, in order
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, substring: str, after_bytes: int = 2000, times: int = 1) -> None:
        with self.lock:
            self.rules.append([substring, after_bytes, times])

    def stall(self) -> None:
        self.stalled = True

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        with self.lock:
            for c in self.clients:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()

    def _note(self, data: bytes) -> str:
        line = data.split(b"\r\n", 1)[0].decode("latin-1")
        if line.split(" ", 1)[0] in ("GET", "PUT", "POST", "HEAD", "DELETE"):
            with self.lock:
                self.requests.append(line)
            return line
        return ""

    def _swallow(self, client: socket.socket) -> None:
        """Read the client's requests and never answer, until it or the proxy closes the connection."""
        try:
            while not self.closed:
                data = client.recv(65536)
                if not data:
                    return
                self._note(data)
        except OSError:
            pass

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self.lock:
            self.clients.append(client)
        if self.stalled:
            self._swallow(client)
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        state = {"cut": None}  # bytes of response still allowed for the request being cut, or None

        def upstream() -> None:  # client -> server, watching request lines
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    if self.stalled:  # an open connection goes quiet too: nothing more reaches the server
                        self._note(data)
                        continue
                    line = self._note(data)
                    if line:
                        with self.lock:
                            for rule in self.rules:
                                if rule[2] > 0 and rule[0] in line:
                                    rule[2] -= 1
                                    state["cut"] = rule[1]
                                    self.dropped.append(line)
                                    break
                    server.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    server.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        t = threading.Thread(target=upstream, daemon=True)
        t.start()
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                if state["cut"] is not None:
                    keep = state["cut"]
                    if len(data) >= keep:
                        client.sendall(data[:keep])
                        break  # the connection drops here, mid-response
                    state["cut"] = keep - len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


@dataclass
class S3Server:
    endpoint: str  # what clients use (through the proxy)
    direct: str  # the server itself
    proxy: DropProxy
    env: dict = field(default_factory=dict)  # the variables a client process needs

    def bucket(self) -> str:
        """A new empty bucket; returns its name."""
        import fsspec

        name = f"metalm-test-{uuid.uuid4().hex[:10]}"
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto", reason="the test extra installs moto[server] (pip install -e '.[test]')")
    pytest.importorskip("s3fs", reason="the test extra installs s3fs (pip install -e '.[test]')")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in (*FAKE_KEYS, "AWS_ENDPOINT_URL")}
    proxy = None
    try:
        _wait_listening(port, proc)
        proxy = DropProxy(port)
        endpoint = f"http://127.0.0.1:{proxy.port}"
        env = dict(FAKE_KEYS, AWS_ENDPOINT_URL=endpoint)
        os.environ.update(env)
        yield S3Server(endpoint=endpoint, direct=f"http://127.0.0.1:{port}", proxy=proxy, env=env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if proxy is not None:
            proxy.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
