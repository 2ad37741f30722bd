"""Operations: rank/rendezvous derivation (launchers/dist_env.py), exercised on simulated environments and by
real 2-process gloo groups. The Slurm and Kubernetes launchers are tested in test_ops_launchers.py, the
Dockerfile in test_ops_docker.py.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from procs import no_launcher_env

REPO = Path(__file__).resolve().parents[1]
DIST_ENV = REPO / "launchers" / "dist_env.py"  # the shell scripts' entry point
DIST_ENV_MODULE = REPO / "metalm" / "dist_env.py"  # the logic (standard library only, loadable by path)



def _load_dist_env():
    spec = importlib.util.spec_from_file_location("metalm_dist_env", DIST_ENV_MODULE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


de = _load_dist_env()


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
    out = subprocess.run([sys.executable, str(DIST_ENV), "--rdzv-endpoint"], env=no_launcher_env(**env),
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (0, "gpu07:19242\n"), out.stderr


def test_cli_export_is_eval_able_by_a_shell():
    env = no_launcher_env(**_slurm_task(6, nodelist="node[1-2]", job_id="4242"))
    out = subprocess.run(["bash", "-c", f'eval "$({shlex.quote(sys.executable)} {DIST_ENV} --export)"; '
                                        'echo "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT"'],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "8", "2", "node1", "19242"]


def test_cli_reports_inconsistent_env_with_status_2():
    env = no_launcher_env(**_slurm_task(9))
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
    env = no_launcher_env(OMP_NUM_THREADS="1", **extra)
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
                           "--master_addr=127.0.0.1", f"--master_port={port}", str(script), str(DIST_ENV_MODULE),
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
        procs.append(subprocess.Popen([sys.executable, str(script), str(DIST_ENV_MODULE), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-4000:]
    recs = _check_group(tmp_path, 2)
    assert {(r["derived"]["MASTER_ADDR"], r["derived"]["MASTER_PORT"]) for r in recs} == {("localhost", str(port))}
