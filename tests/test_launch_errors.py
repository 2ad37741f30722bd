"""Launch errors and exit statuses (issue 26 item 6): a rendezvous port already in use is one line naming the
port and the fix instead of torch's DistNetworkError trace; the launchers' own exit statuses after a stop
signal are what docs/troubleshooting.md says they are."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import cpu_run_env

from metalm.train.dist import rendezvous_error

REPO = Path(__file__).resolve().parents[1]


def test_rendezvous_errors_are_one_line_with_the_fix():
    in_use = RuntimeError("The server socket has failed to listen on any local network address. port: 29517, "
                          "useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")
    line = rendezvous_error(in_use, {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29517"})
    assert "10.0.0.1:29517" in line and "already in use" in line and "--master_port" in line and "\n" not in line
    refused = RuntimeError("The client socket has timed out after 60s while trying to connect to (10.0.0.9, 29517)."
                           "\nException raised from ... (most recent call first):\nframe #0: c10::...")
    line = rendezvous_error(refused, {"MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29517"})
    assert line.startswith("cannot rendezvous at 10.0.0.9:29517 (MASTER_ADDR:MASTER_PORT): The client socket has "
                           "timed out") and "frame #0" not in line and "\n" not in line


def test_a_rendezvous_port_in_use_is_one_line_naming_it(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(cpu_run_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        out = subprocess.run([sys.executable, str(REPO / "launchers" / "pretrain.py"), "--config",
                              str(REPO / "configs" / "cpu-tiny.yaml"), "logging.wandb=false",
                              f"train.run_dir={tmp_path / 'run'}", "data.prepare_if_missing=false"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "DistNetworkError" not in out.stderr, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("metalm: error")]
    assert errors == [f"metalm: error (rank 0): the rendezvous port 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) is "
                      f"already in use, by another job or a run that has not exited: pick a free port with "
                      f"--master_port N (deepspeed, torchrun) or MASTER_PORT=N (Slurm, a manual launch)"]


# ------------------------------------------------------------------------------------------ stop statuses

TRAIN = ["--config", str(REPO / "configs" / "cpu-tiny.yaml"), "train.seq_len=64", "model.max_seq_len=64",
         "train.micro_batch=4", "train.global_batch=8", "model.n_layers=2", "train.max_steps=300",
         "train.log_every=1", "train.val_every=0", "checkpoint.every=1000", "logging.wandb=false",
         "logging.progress=false", "data.prepare_if_missing=false", "meta.n_way=4", "meta.k_shot=2",
         "meta.q_queries=2", "meta.inner_steps=2"]
LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={port}"],
    "deepspeed": lambda port: [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                               "--no_local_rank", "--master_port", str(port)],
}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _terminal_signals() -> None:
    """In the launcher's process: SIGINT as a terminal's foreground job has it. A test run started in the
    background (`make test &`, nohup, some CI runners) inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt in the deepspeed runner, whose status becomes its launcher's 1 instead of 130."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def documented_status(launcher: str, signal_words: str) -> int:
    """The exit status docs/troubleshooting.md's table gives for `launcher` and the row's signal column."""
    for line in (REPO / "docs" / "troubleshooting.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] == f"`{launcher}`" and cells[1].startswith(signal_words):
            return int(cells[2])
    raise AssertionError(f"docs/troubleshooting.md has no row for {launcher} / {signal_words}")


@pytest.mark.slow
@pytest.mark.parametrize("launcher,signame,to_group,words", [
    ("torchrun", "SIGTERM", False, "SIGTERM to torchrun"),
    ("deepspeed", "SIGINT", True, "Ctrl-C"),
    ("deepspeed", "SIGTERM", False, "SIGTERM to the runner's PID alone"),
])
def test_a_stopped_run_exits_with_the_documented_launcher_status(tmp_path, shards, launcher, signame, to_group,
                                                                   words):
    """The ranks checkpoint at the next step and exit, nothing of the run is left running, and the launcher's own
    status is the documented one (a SIGTERM to the deepspeed runner alone: the ranks notice that it died)."""
    run_dir = tmp_path / "run"
    log = tmp_path / "out.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [*LAUNCHERS[launcher](port), str(REPO / "launchers" / "pretrain.py"), *TRAIN, f"data.shards={shards}",
           f"train.run_dir={run_dir}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_run_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_terminal_signals)
    try:
        deadline = time.monotonic() + 240
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        sig = getattr(signal, signame)
        os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
        rc = proc.wait(timeout=120)
        while _group_alive(proc.pid):  # the launcher may exit before its ranks have finished
            assert time.monotonic() < deadline + 120, "processes of the run are still running"
            time.sleep(0.3)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    stopped = [ln for ln in text.splitlines() if "metalm: stopped by" in ln]
    assert len(stopped) == 1, text[-3000:]
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    status = rc if rc >= 0 else 128 - rc  # what a shell reports for a process killed by a signal
    assert status == documented_status(launcher, words), (rc, text[-3000:])
