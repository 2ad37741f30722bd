"""A one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd (Debian's slurm-wlm and munge,
which `.ci/run` installs), run as root from a temporary directory with their own configuration, key, sockets,
spool and state, so that nothing under /etc is used or changed and several sessions never share a daemon.

    with SlurmCluster(tmp_dir) as cluster:
        job = cluster.sbatch(["launchers/slurm/pretrain.sbatch", ...], cwd=repo, env=env)
        cluster.wait(job, {"COMPLETED"}, timeout=300)
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing() -> str | None:
    """Why this machine cannot run the cluster (None when it can): the binaries, and root (slurmd runs as root
    to start jobs as the submitting user)."""
    absent = [name for name in (*DAEMONS, "sbatch", "squeue", "scontrol", "scancel", "sinfo")
              if shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin") is None]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install slurm-wlm munge; .ci/run does)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


class SlurmCluster:
    """munged + slurmctld + slurmd for one node named after this host, with CPUs=`cpus` (over-subscribing the
    machine is allowed: the configuration wins over what slurmd detects)."""

    def __init__(self, root: Path, cpus: int = 4):
        self.root = Path(root)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin"

    # ------------------------------------------------------------------------------------------ set-up

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(f"""\
ClusterName=metalmtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge' / 'munge.socket'},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobRequeue=0
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
MinJobAge=3600
KillWait=10
SlurmctldDebug=info
SlurmdDebug=info
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 (open as long as the daemon runs)
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> SlurmCluster:
        self._write_config()
        m = self.root / "munge"
        self._start("munged", ["munged", "--foreground", "--force", f"--socket={m / 'munge.socket'}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._until(lambda: (m / "munge.socket").exists(), "munged's socket", timeout)
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._until(lambda: self._run(["scontrol", "ping"]).stdout.count("UP") >= 1, "slurmctld", timeout)
        self._start("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._until(lambda: self.node_state() in {"IDLE", "MIXED", "ALLOCATED"}, "the node to be idle", timeout)
        return self

    def stop(self) -> None:
        """Cancel every job and wait (at most a minute) until none runs, then SIGTERM the daemons (slurmd first)
        and wait for them."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._run(["scancel", f"--user={os.getuid()}"])
            end = time.monotonic() + 60
            while self._run(["squeue", "-h", "-t", "RUNNING,COMPLETING"]).stdout.strip() and time.monotonic() < end:
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ use

    def _run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=60, **kw)

    def _until(self, cond, what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not cond():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > end:
                raise RuntimeError(f"Slurm test cluster: {'died: ' + ', '.join(dead) if dead else 'timed out'} "
                                   f"waiting for {what}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            out.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def node_state(self) -> str:
        res = self._run(["sinfo", "-h", "-N", "-o", "%T", "-n", self.node])
        return res.stdout.strip().upper().rstrip("*~#!%$@^-")

    def sbatch(self, args: list[str], cwd: Path, env: dict) -> int:
        res = self._run(["sbatch", "--parsable", *args], cwd=cwd, env={**env, "SLURM_CONF": str(self.conf),
                                                                        "PATH": self.env["PATH"]})
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: {res.stderr.strip()}")
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job`'s fields (JobState, ExitCode, StdOut, Restarts, ...)."""
        res = self._run(["scontrol", "show", "job", "-o", str(job_id)])
        if res.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {res.stderr.strip()}")
        fields = {}
        for token in res.stdout.split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def state(self, job_id: int) -> str:
        return self.job(job_id)["JobState"]

    def wait(self, job_id: int, states: set[str], timeout: float) -> str:
        """Poll until the job is in one of `states` (or has ended in another: an error naming it)."""
        end = time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if state in states:
                return state
            if state in DONE:
                raise AssertionError(f"job {job_id} ended {state}, expected {sorted(states)}: {self.job(job_id)}")
            if time.monotonic() > end:
                raise AssertionError(f"job {job_id} still {state} after {timeout:.0f} s (expected "
                                     f"{sorted(states)})\n{self.logs()}")
            time.sleep(0.5)

    def command(self, words: list[str]) -> str:
        """Run a Slurm client command (scancel, scontrol, ...) against this cluster; its stdout."""
        res = self._run(words)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(words)}: exit {res.returncode}: {res.stderr.strip()}")
        return res.stdout
