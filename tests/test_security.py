"""Untrusted files never run code; credentials never leave the environment.

- every torch.load in our code reads with weights_only=True, and nothing unpickles or yaml.load()s otherwise;
- resuming reads DeepSpeed's pickled checkpoint files with weights_only=True too: a tampered file is refused
  (DeepSpeed alone would run its payload);
- exported and checkpointed weights are safetensors;
- W&B and cloud credentials set in the environment of a real run (W&B on, offline) appear in no file under
  the run directory (W&B's offline files included) and in neither stdout nor stderr; nor, for a run that reads
  its shards from a bucket and checkpoints to it (a real S3-compatible server on 127.0.0.1) and an evaluator
  pass over that bucket, in any object of the bucket or any file of the evaluator's results.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from s3server import s3_server  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("metalm", "launchers", "kernels", "benchmarks", "scripts")


# ------------------------------------------------------------------------------------------------ code scan


def unsafe_calls(source: str, name: str = "<string>") -> list[str]:
    """Calls that can run code from a file: torch.load without weights_only=True, pickle/dill/cloudpickle/
    joblib loads, yaml.load/unsafe_load/full_load, numpy.load(allow_pickle=True), eval/exec."""
    tree = ast.parse(source, name)
    aliases: dict[str, str] = {}  # local name -> module it stands for ("th" -> "torch")
    funcs: dict[str, str] = {}  # local name -> "module.function" ("load" -> "torch.load")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                funcs[a.asname or a.name] = f"{node.module}.{a.name}"

    def qualname(f: ast.expr) -> str | None:
        if isinstance(f, ast.Name):
            return funcs.get(f.id, f.id)
        if isinstance(f, ast.Attribute):
            base = qualname(f.value) if not isinstance(f.value, ast.Name) else aliases.get(f.value.id, f.value.id)
            return f"{base}.{f.attr}" if base else None
        return None

    def kw(call: ast.Call, key: str):
        for k in call.keywords:
            if k.arg == key:
                return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
        return None

    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        q = qualname(node.func) or ""
        where = f"{name}:{node.lineno}: {q}"
        if q in ("torch.load", "torch.serialization.load") and kw(node, "weights_only") is not True:
            bad.append(where + " without weights_only=True")
        elif (q.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "_pickle")
              and q.endswith(("load", "loads"))) or q in ("yaml.load", "yaml.unsafe_load", "yaml.full_load",
                                                          "yaml.load_all"):
            bad.append(where)
        elif q in ("numpy.load", "np.load") and kw(node, "allow_pickle") not in (None, False):
            bad.append(where + " with allow_pickle")
        elif q in ("eval", "exec"):
            bad.append(where)
    return bad


def test_scanner_finds_every_kind_of_unsafe_load():
    src = ("import torch\nimport torch as th\nfrom torch import load\nimport pickle, yaml\nimport numpy as np\n"
           "torch.load('a')\nth.load('a', weights_only=False)\nload('a')\npickle.loads(b'')\nyaml.load('x')\n"
           "np.load('a', allow_pickle=True)\neval('1')\n"
           "torch.load('ok', weights_only=True)\nyaml.safe_load('x')\nnp.load('a', allow_pickle=False)\n")
    found = unsafe_calls(src)
    assert len(found) == 7, found
    assert all(":1" not in f.split(": ")[0][-2:] for f in found)
    assert not any(f"<string>:{n}:" in " ".join(found) for n in (13, 14, 15))


def test_no_unsafe_load_in_our_code():
    bad = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            bad += unsafe_calls(path.read_text(), str(path.relative_to(REPO)))
    assert not bad, "calls that can run code from a file:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------------------ pickles


class Payload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_resume_refuses_a_tampered_deepspeed_file_that_deepspeed_would_run(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from metalm import checkpoint as ckpt
    from metalm.train.engine import safe_deepspeed_load

    sentinel = tmp_path / "pwned"
    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(sentinel)}, evil)
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    with safe_deepspeed_load(engine), \
            pytest.raises(ckpt.CheckpointError, match="refusing to unpickle it.*posix.system|refusing to unpickle"):
        engine.checkpoint_engine.load(str(evil))
    assert not sentinel.exists()
    # a genuine DeepSpeed-style file still loads, and outside the block DeepSpeed's own loader is back ...
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "good.pt"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "t": torch.ones(2)}, good)
    with safe_deepspeed_load(engine):
        assert engine.checkpoint_engine.load(str(good))["zero_stage"] == ZeroStageEnum.gradients
    # ... and it would have run the payload: the threat is real
    engine.checkpoint_engine.load(str(evil))
    assert sentinel.exists()


def test_rank_state_is_read_without_unpickling_objects(tmp_path):
    from metalm import checkpoint as ckpt

    sentinel = tmp_path / "pwned"
    torch.save({"data": "{}", "rng": Payload(sentinel), "extra": "{}"}, tmp_path / "rank_00000.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"rank_00000\.pt: refusing to unpickle it: .*GLOBAL posix\.system"):
        ckpt.load_rank_state(tmp_path, 0)
    assert not sentinel.exists()


def test_yaml_config_cannot_construct_objects(tmp_path):
    from metalm.config import ConfigError, load_config

    sentinel = tmp_path / "pwned"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train: !!python/object/apply:os.system ['touch {sentinel}']\n")
    with pytest.raises(ConfigError):
        load_config(cfg)
    assert not sentinel.exists()


# ------------------------------------------------------------------------------------------------ secrets

SECRETS = {
    "WANDB_API_KEY": "sk-fake-0123456789abcdef0123456789abcdef01234567",
    "AWS_SECRET_ACCESS_KEY": "fAkEsEcReT/K7MDENG/bPxRfiCYEXAMPLEKEY0123",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE0123",
    "HF_TOKEN": "hf_fakefakefakefakefakefakefakefake01",
}


@pytest.mark.slow
def test_credentials_never_reach_logs_configs_or_checkpoints(tmp_path, shards):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONUNBUFFERED="1",
               **SECRETS)
    env.pop("TRITON_INTERPRET", None)
    env.pop("WANDB_SILENT", None)
    cmd = [sys.executable, str(REPO / "launchers" / "pretrain.py"), "--config", str(REPO / "configs" / "cpu-tiny.yaml"),
           "train.seq_len=64", "model.max_seq_len=64", "model.n_layers=2", "train.micro_batch=4",
           "train.global_batch=8", "train.max_steps=3", "train.log_every=1", "train.val_every=0",
           "checkpoint.every=2", "data.prepare_if_missing=false", f"data.shards={shards}", f"train.run_dir={run_dir}",
           "logging.wandb=true", "logging.mode=offline", "meta.n_way=4", "meta.k_shot=2", "meta.q_queries=2",
           "meta.inner_steps=2"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files), "no W&B offline files: the test would prove nothing"
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "config.yaml" for p in files)
    leaks = []
    for name, value in SECRETS.items():
        needle = value.encode()
        leaks += [f"{name} in {p.relative_to(run_dir)}" for p in files if needle in p.read_bytes()]
        leaks += [f"{name} in {stream}" for stream, text in (("stdout", out.stdout), ("stderr", out.stderr))
                  if value in text]
    assert not leaks, leaks
    # checkpointed weights are safetensors; the only pickles are the ones read back with weights_only=True
    pickles = {p.suffix for p in files if "checkpoints" in p.parts and p.suffix in (".pt", ".pkl", ".bin")}
    assert pickles <= {".pt"}


@pytest.mark.slow
def test_credentials_never_reach_logs_checkpoints_or_the_bucket(tmp_path, shards, s3_server):  # noqa: F811
    import fsspec

    bucket = s3_server.bucket()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(shards), f"{bucket}/shards", recursive=True)
    # the S3 keys of this run are the fake secrets themselves: the server accepts any, so they are really used
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONUNBUFFERED="1",
               **SECRETS)
    env.pop("TRITON_INTERPRET", None)
    env.pop("WANDB_SILENT", None)
    local = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launchers" / "pretrain.py"), "--config", str(REPO / "configs" / "cpu-tiny.yaml"),
           "train.seq_len=64", "model.max_seq_len=64", "model.n_layers=2", "train.micro_batch=4",
           "train.global_batch=8", "train.max_steps=3", "train.log_every=1", "train.val_every=0",
           "checkpoint.every=2", "data.prepare_if_missing=false", f"data.shards=s3://{bucket}/shards",
           f"train.run_dir=s3://{bucket}/run", f"train.local_dir={local}", "logging.wandb=true",
           "logging.mode=offline", "meta.n_way=4", "meta.k_shot=2", "meta.q_queries=2", "meta.inner_steps=2"]
    train = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    results = tmp_path / "eval"
    evaluate = subprocess.run([sys.executable, str(REPO / "launchers" / "evaluate.py"), "--watch",
                               f"s3://{bucket}/run", "--once", "--results", str(results), "--no-wandb", "--device",
                               "cpu", "--config", "eval.metrics=[val_loss]", "eval.val_batches=1",
                               "eval.batch_size=2", "eval.seq_len=64"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    objects = {p: fs.cat_file(p) for p in fs.find(f"{bucket}/run")}
    assert any(p.endswith("/COMPLETE") for p in objects) and any(p.endswith("model.safetensors") for p in objects)
    files = [p for root in (local, results) for p in root.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any(p.name.startswith("step_") for p in results.iterdir())
    leaks = []
    for name, value in SECRETS.items():
        needle = value.encode()
        leaks += [f"{name} in {p}" for p in files if needle in p.read_bytes()]
        leaks += [f"{name} in s3://{p}" for p, data in objects.items() if needle in data]
        leaks += [f"{name} in {what}" for what, text in (("trainer stdout", train.stdout), ("trainer stderr",
                  train.stderr), ("evaluator stdout", evaluate.stdout), ("evaluator stderr", evaluate.stderr))
                  if value in text]
    assert not leaks, leaks
