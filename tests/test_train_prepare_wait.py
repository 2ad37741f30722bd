"""Rank 0 prepares the shards while the other ranks wait: that wait is not bounded by train.collective_timeout
(a first preparation can take hours), while a later collective still is. Two real gloo processes."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from procs import cpu_run_env, free_port

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 3  # the process group's collective timeout
PREPARE_S = 6  # rank 0's preparation: twice as long

SCRIPT = textwrap.dedent("""
    import datetime, json, os, sys, time
    from types import SimpleNamespace
    import torch.distributed as tdist
    from metalm.config import load_config
    from metalm.train.dist import Collectives, Dist
    from metalm.train.loop import Trainer
    import torch

    rank, out, timeout_s, prepare_s = int(os.environ["RANK"]), sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    tdist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    dist = Dist(rank, 2, rank, torch.device("cpu"))
    stub = SimpleNamespace(cfg=load_config(sys.argv[4]), dist=dist, comm=Collectives(dist))

    def ensure_prepared(data, **kw):  # rank 0 writes the manifest; the others read it
        if rank == 0:
            time.sleep(prepare_s)
            with open(os.path.join(out, "manifest.json"), "w") as f:
                json.dump({"prepared_by": 0}, f)
        with open(os.path.join(out, "manifest.json")) as f:
            return json.load(f)

    t0 = time.monotonic()
    manifest = Trainer._prepared_data(stub, ensure_prepared)
    waited = time.monotonic() - t0
    try:  # the collective timeout still holds for a plain collective: rank 0 never joins this one
        if rank == 1:
            stub.comm.barrier()
        late = None
    except Exception as e:
        late = type(e).__name__
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"manifest": manifest, "waited": waited, "late": late}, f)
    if rank == 0:
        time.sleep(timeout_s + 2)  # stay until rank 1's barrier has timed out
    os._exit(0)
""")


def test_other_ranks_wait_for_a_preparation_longer_than_the_collective_timeout(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(SCRIPT)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(TIMEOUT_S), str(PREPARE_S),
                               str(REPO / "configs" / "cpu-tiny.yaml")],
                              env=dict(cpu_run_env(), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["manifest"] for r in ranks] == [{"prepared_by": 0}] * 2
    assert ranks[1]["waited"] > TIMEOUT_S  # it waited past the collective timeout, for rank 0
    assert ranks[1]["late"] is not None and ranks[0]["late"] is None
