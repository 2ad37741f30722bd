"""metalm.locks: one exclusive file lock whose holder (host, pid, since) is named to whoever finds it taken, for the
run directory, the evaluator's results and the shards directory (the first two are tested with their users in
test_train_preflight.py and test_eval_watcher.py)."""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr

import pytest

from metalm.locks import HeldLock, LockBusy


def test_the_holder_is_recorded_and_named_to_the_next_one(tmp_path):
    first = HeldLock(tmp_path / "d" / ".lock", lambda holder: f"busy: {holder}")
    first.acquire()
    try:
        record = json.loads((tmp_path / "d" / ".lock").read_text())
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        since = dt.datetime.strptime(record["since"], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=dt.timezone.utc)
        assert abs((dt.datetime.now(dt.timezone.utc) - since).total_seconds()) < 60
        other = subprocess.run([sys.executable, "-c", "import sys; from metalm.locks import HeldLock; "
                                f"HeldLock({str(tmp_path / 'd' / '.lock')!r}, lambda h: 'busy: ' + h).acquire()"],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0
        assert (f"LockBusy: busy: host {socket.gethostname()}, pid {os.getpid()}, since {record['since']}"
                in other.stderr), other.stderr
        # the loser did not truncate the holder's record
        assert json.loads((tmp_path / "d" / ".lock").read_text()) == record
    finally:
        first.release()
    assert not first.held
    again = HeldLock(tmp_path / "d" / ".lock", str)
    again.acquire()  # released: the next one takes it and records itself
    again.release()


def test_an_unreadable_record_still_refuses_and_says_so(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from metalm.locks import HeldLock; "
                               f"lock = HeldLock({str(tmp_path / '.lock')!r}, str); lock.acquire(); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / ".lock").write_text("not json")  # the lock is on the file, not on its contents
        with pytest.raises(LockBusy, match=r"^taken \(holder unknown\)$"):
            HeldLock(tmp_path / ".lock", lambda h: f"taken ({h})").acquire()
    finally:
        holder.kill()
        holder.wait()


def test_the_preparer_waits_for_the_holder_of_the_shards_directory_and_names_it(tmp_path):
    from metalm.data.prepare import _dir_lock
    from metalm.storage import LocalStore

    held = HeldLock(tmp_path / ".prepare.lock", str)
    held.acquire()
    entered = threading.Event()
    err = io.StringIO()

    def prepare() -> None:
        with redirect_stderr(err), _dir_lock(LocalStore(tmp_path)):
            entered.set()

    t = threading.Thread(target=prepare)
    t.start()
    time.sleep(1.0)
    assert not entered.is_set()  # waits while the first holds it
    assert err.getvalue() == (f"metalm-prepare: waiting for the preparer writing {tmp_path} ({held.holder()})\n")
    held.release()
    t.join(timeout=30)
    assert entered.is_set()
