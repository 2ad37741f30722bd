"""Launch errors and exit statuses (issue 26 item 6): a rendezvous port already in use is one line naming the
port and the fix instead of torch's DistNetworkError trace; the launchers' own exit statuses after a stop
signal are what docs/troubleshooting.md says they are."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

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
