"""What users see on the command line: metalm-train's --help / --print-config / --dry-run and its console output,
the metalm-train and metalm-evaluate console scripts of a built wheel, the NER fine-tune's epoch lines and the
reproduction study's default output location."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from procs import DIST_VARS, cpu_run_env, no_launcher_env

from metalm.config import load_config, to_dict
from metalm.train.engine import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"
CPU_TINY = REPO / "configs" / "cpu-tiny.yaml"


def _launcher_main():
    """launchers/pretrain.py's main, loaded as `deepspeed`/`python` would run it (launchers/ on sys.path)."""
    spec = importlib.util.spec_from_file_location("metalm_pretrain_wrapper", LAUNCHER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture
def no_launcher(monkeypatch):
    for var in (*DIST_VARS, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(REPO / "launchers"))


@pytest.fixture
def no_process_group(monkeypatch):
    """Fails the test if anything starts a process group."""
    from metalm.train import engine

    def refuse(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(engine, "init_distributed", refuse)
    yield
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _sections(out: str) -> tuple[str, list[str], str]:
    """(YAML, the '# ' lines after it, the DeepSpeed JSON) of --print-config's output."""
    lines = out.splitlines()
    assert lines[0].startswith("# resolved config: ")
    world = next(i for i, ln in enumerate(lines) if ln.startswith("# world: "))
    ds = next(i for i, ln in enumerate(lines) if ln.startswith("# DeepSpeed config"))
    end = next(i for i in range(ds + 1, len(lines)) if lines[i] == "}")
    return "\n".join(lines[1:world]), lines[world:ds + 1] + lines[end + 1:], "\n".join(lines[ds + 1:end + 1])


# ================================================================================ --help, --print-config, --dry-run


def test_help_names_the_configuration_reference():
    out = subprocess.run([sys.executable, str(LAUNCHER), "--help"], cwd=REPO, env=cpu_run_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "docs/configuration.md" in out.stdout
    assert "--print-config" in out.stdout and "--dry-run" in out.stdout


def test_print_config_prints_yaml_geometry_and_deepspeed_json(no_launcher, no_process_group, capsys):
    overrides = ["train.global_batch=64", "train.micro_batch=4", "train.zero_stage=1"]
    rc = _launcher_main()(["--config", str(CPU_TINY), "--print-config", "--world-size", "4", *overrides])
    assert rc == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    text, notes, ds = _sections(cap.out)
    cfg = load_config(CPU_TINY, overrides, world_size=4)
    assert yaml.safe_load(text) == to_dict(cfg)
    assert json.loads(ds) == deepspeed_config(cfg.optim, cfg.train, 4)
    assert notes[0] == "# world: 4 processes (--world-size)"
    assert notes[1].startswith("# batch: micro_batch 4 x grad_accum 4 x world 4 = global_batch 64 sequences of 128 "
                               "tokens (8,192 tokens per optimizer step)")


def test_print_config_takes_the_world_size_from_the_launcher(no_launcher, no_process_group, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert _launcher_main()(["--config", str(CPU_TINY), "--print-config"]) == 0
    _, notes, ds = _sections(capsys.readouterr().out)
    assert notes[0] == "# world: 2 processes (WORLD_SIZE from the launcher)"
    assert json.loads(ds)["gradient_accumulation_steps"] == 1  # 16 = 8 x 1 x 2
    monkeypatch.setenv("RANK", "1")  # the other ranks stay quiet
    assert _launcher_main()(["--config", str(CPU_TINY), "--print-config"]) == 0
    assert capsys.readouterr().out == ""


def test_print_config_refuses_an_impossible_geometry(no_launcher, no_process_group, capsys):
    assert _launcher_main()(["--config", str(CPU_TINY), "--print-config", "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metalm: configuration error: train.global_batch=16") and err.count("\n") == 1
    assert _launcher_main()(["--config", str(CPU_TINY), "--world-size", "2"]) == 2  # not for a real run
    assert "--world-size only previews" in capsys.readouterr().err


def test_dry_run_reports_model_memory_and_data_without_training(no_launcher, no_process_group, shards, tmp_path,
                                                                  capsys):
    from metalm.meta.head import build_head
    from metalm.model import num_params
    from metalm.train.preflight import step_memory_bytes

    run_dir = tmp_path / "run"
    overrides = [f"data.shards={shards}", "train.seq_len=64", "model.max_seq_len=64", f"train.run_dir={run_dir}"]
    assert _launcher_main()(["--config", str(CPU_TINY), "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    _, notes, _ = _sections(out)  # everything --print-config prints, first
    cfg = load_config(CPU_TINY, overrides, world_size=1)
    lm = num_params(cfg.model)
    head = sum(p.numel() for p in build_head(cfg.meta, cfg.model.d_model, cfg.model.vocab_size).parameters())
    model = next(ln for ln in notes if ln.startswith("# model: "))
    assert f"({lm:,}; tied embeddings" in model and f"meta head {head / 1e6:.2f}M ({head:,}; 4 layers)" in model
    parts = step_memory_bytes(lm + head, d_model=48, n_layers=4, ffn_hidden=192, vocab_size=50304, micro_batch=8,
                              seq_len=64, precision="fp32", zero_stage=2, world_size=1, fused_linear_ce=False)
    memory = next(ln for ln in notes if ln.startswith("# memory per rank"))
    assert f"{sum(parts.values()) / 2**20:.1f} MiB (parameters" in memory
    assert "# memory check on this machine (cpu): fits" in notes
    man = json.loads((shards / "manifest.json").read_text())
    data = next(ln for ln in notes if ln.startswith("# data: "))
    assert f"{shards / 'manifest.json'}: train {man['splits']['train']['samples']:,} samples" in data
    assert notes[-1] == "# dry run: nothing trained, no process group started, nothing written"
    assert not run_dir.exists()


def test_dry_run_says_what_would_stop_the_run(no_launcher, no_process_group, tmp_path, capsys):
    rc = _launcher_main()(["--config", str(REPO / "configs" / "11m.yaml"), "--dry-run", "--world-size", "8",
                           f"data.shards={tmp_path / 'none'}", "data.prepare_if_missing=false"])
    assert rc == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("# ")]
    assert any(ln.startswith("# model: 11.28M parameters") for ln in notes)
    assert any("world 8)" in ln for ln in notes if ln.startswith("# memory per rank"))
    if not torch.cuda.is_available():
        assert any(ln.startswith("# device: the run would stop here: train.device=cuda") for ln in notes)
    assert any("data.prepare_if_missing=false: the run would stop" in ln for ln in notes)


def test_dry_run_flags_an_empty_validation_split(no_launcher, no_process_group, shared_data, tmp_path, capsys):
    """50 documents at val_fraction 0.01 give no validation sample; cpu-tiny validates every 100 steps."""
    from metalm.data import prepare

    out = tmp_path / "small"
    man = prepare(str(shared_data / "corpus" / "wiki-vital-en-fr-es.jsonl"),
                  str(shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"), out, 64, val_fraction=0.01,
                  max_docs=50, num_proc=1, progress=False)
    assert man["splits"]["val"]["samples"] == 0
    overrides = [f"data.shards={out}", "train.seq_len=64", "model.max_seq_len=64", f"train.run_dir={tmp_path / 'r'}"]
    assert _launcher_main()(["--config", str(CPU_TINY), "--dry-run", *overrides]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("# data: ")]
    assert any(ln.startswith(f"# data: the run would stop: train.val_every=100 needs validation samples: {out}: "
                             "the validation split is empty") for ln in notes), notes
    assert _launcher_main()(["--config", str(CPU_TINY), "--dry-run", *overrides, "train.val_every=0"]) == 0
    assert "the run would stop" not in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_cuda_config_on_a_cpu_box_ends_in_one_line():
    env = cpu_run_env()
    env.pop("DS_ACCELERATOR")  # a user's shell: nothing set
    out = subprocess.run([sys.executable, str(LAUNCHER), "--config", "configs/11m.yaml"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [out.stderr.strip()], out.stderr  # one line, nothing before or after
    assert out.stderr.startswith("metalm: error: train.device=cuda: no CUDA device is visible (")
    assert "use train.device=cpu" in out.stderr
    assert out.stdout == ""


# ================================================================================ console output of a run


def test_wandb_silent_is_a_default_the_user_can_override(monkeypatch):
    from metalm.cli.train import quiet_upstream

    monkeypatch.delenv("WANDB_SILENT", raising=False)
    quiet_upstream()
    assert os.environ["WANDB_SILENT"] == "true"
    monkeypatch.setenv("WANDB_SILENT", "false")
    quiet_upstream()
    assert os.environ["WANDB_SILENT"] == "false"


@pytest.mark.parametrize("entry", ["metalm-train", "launchers/pretrain.py"])
def test_both_entry_points_keep_freed_memory_before_the_run(entry, monkeypatch):
    """The installed console script and the launcher script make the same glibc mallopt calls (the allocator
    setting that keeps a CPU step's temporaries from being page-faulted in anew) before main() runs."""
    import ctypes
    import runpy
    from importlib.metadata import entry_points

    import metalm.cli.train as cli

    events = []

    class FakeLibc:
        def mallopt(self, param, value):
            events.append(("mallopt", param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(sys, "platform", "linux")
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(cli, "main", lambda argv=None: events.append(("main",)) or 0)
    monkeypatch.setattr(cli, "exit_now", lambda status: events.append(("exit", status)))
    if entry == "metalm-train":
        (ep,) = entry_points(group="console_scripts", name="metalm-train")
        ep.load()()
    else:
        runpy.run_path(str(LAUNCHER), run_name="__main__")
    assert events == [("mallopt", -3, 32 << 20), ("mallopt", -1, 1 << 30), ("main",), ("exit", 0)]


@pytest.mark.slow
def test_a_run_prints_no_upstream_deprecation_and_no_wandb_banner(shards, tmp_path):
    """ZeRO-3 in one process calls torch's deprecated all_gather_into_tensor / reduce_scatter_tensor through
    DeepSpeed's comm layer; W&B offline prints a banner and a run summary unless silenced."""
    run_dir = tmp_path / "run"
    env = cpu_run_env()
    env.pop("WANDB_SILENT", None)  # as in a user's shell (tests/conftest.py sets it)
    cmd = [sys.executable, str(LAUNCHER), "--config", str(CPU_TINY), "train.seq_len=64", "model.max_seq_len=64",
           "model.n_layers=2", "train.micro_batch=4", "train.global_batch=8", "train.max_steps=2",
           "train.log_every=1", "train.val_every=0", "checkpoint.every=2", "train.zero_stage=3",
           "data.prepare_if_missing=false", f"data.shards={shards}", f"train.run_dir={run_dir}",
           "logging.wandb=true", "logging.mode=offline", "meta.n_way=4", "meta.k_shot=2", "meta.q_queries=2",
           "meta.inner_steps=2", "meta.grad_ratio=0"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert any(run_dir.glob("wandb/offline-run-*")), "W&B did not run: the test would prove nothing"
    assert "metalm: done, 2 steps" in out.stdout
    assert "FutureWarning" not in out.stderr and "is deprecated" not in out.stderr, out.stderr[-3000:]
    wandb_lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("wandb:")]
    assert not wandb_lines, wandb_lines


# ================================================================================ console scripts of the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the project (the build leaves nothing in the working tree)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("metalm", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(root / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (whl,) = (root / "dist").glob("metalm-*.whl")
    return whl


def test_wheel_holds_the_train_entry_module_and_console_scripts(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {"metalm/cli/__init__.py", "metalm/cli/train.py", "metalm/cli/preview.py",
            "metalm/eval/watcher.py"} <= names
    assert not any(n.startswith("launchers/") for n in names)
    assert "metalm-train = metalm.cli.train:console_main" in entry_points
    assert "metalm-evaluate = metalm.eval.watcher:main" in entry_points


def test_installed_console_scripts_run_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                          str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    env = no_launcher_env(PYTHONPATH=str(site), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(site / "bin" / argv[0]), *argv[1:]], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=120)

    where = subprocess.run([sys.executable, "-c", "import metalm.cli.train as m; print(m.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(site)), where  # the wheel's copy, not the source tree
    res = run("metalm-train", "--help")
    assert res.returncode == 0 and "docs/configuration.md" in res.stdout, res.stderr
    res = run("metalm-train", "--print-config")  # no configs/ folder beside an installed package
    assert res.returncode == 2 and "pass --config FILE" in res.stderr
    res = run("metalm-train", "--config", str(CPU_TINY), "--print-config")
    assert res.returncode == 0 and '"train_micro_batch_size_per_gpu": 8' in res.stdout, res.stderr
    res = run("metalm-evaluate", "--help")
    assert res.returncode == 0 and "--watch" in res.stdout, res.stderr


# ================================================================================ NER epoch lines


def test_ner_epoch_lines_never_print_a_nan_loss():
    from metalm.eval import ner
    from metalm.eval.iob2 import Sentence
    from metalm.model import build_model

    tiny = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=64",
            "model.vocab_size=64", "model.max_seq_len=32", "train.seq_len=32"]
    words = ["Ann", "met", "Bob", "in", "Rome", "today"]
    sents = [Sentence(words[i % 3:i % 3 + 4], ["B-PER", "O", "B-PER", "O"][: len(words[i % 3:i % 3 + 4])])
             for i in range(6)]

    def encode(word, i):
        return [1 + words.index(word)]

    torch.manual_seed(0)
    model = build_model(load_config(None, tiny).model)
    lines: list[str] = []
    # 6 sentences, batch 4: 2 steps an epoch, 10 in all, logged at steps 4, 8 and 10 (the last): epochs 1 and 3
    # log nothing (before: "loss nan", then epoch 2's value again)
    cfg = load_config(None, tiny + ["eval.ner.epochs=5", "eval.ner.batch_size=4", "eval.ner.log_every=4"]).eval.ner
    res = ner.finetune(model, encode, sents, cfg, progress=lines.append)
    assert res.loss_steps == [4, 8, 10]
    assert len(lines) == 5 and not any("nan" in ln for ln in lines), lines
    for epoch in (1, 3):
        assert lines[epoch - 1] == f"ner epoch {epoch}/5: 2 steps, no loss logged in this epoch (eval.ner.log_every=4)"
    for epoch, value in ((2, res.loss_values[0]), (4, res.loss_values[1]), (5, res.loss_values[2])):
        assert lines[epoch - 1] == f"ner epoch {epoch}/5: loss {value:.4f}"


# ================================================================================ commands metalm suggests


def test_the_suggested_prepare_command_quotes_a_glob(tmp_path):
    from metalm.data import DataError, ensure_prepared

    cfg = load_config(None, ["data.source=corpus/*.jsonl", f"data.shards={tmp_path / 'my shards'}",
                             "data.prepare_if_missing=false"])
    with pytest.raises(DataError) as e:
        ensure_prepared(cfg.data, seq_len=64, vocab_size=50304, seed=0)
    assert f"--source 'corpus/*.jsonl' --tokenizer builtin:olmo --seq-len 64 --out '{tmp_path / 'my shards'}'" \
        in str(e.value)


# ================================================================================ the reproduction study


def test_reproduce_writes_beside_its_runs_unless_told_otherwise(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("metalm_reproduce", REPO / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fake_repo = tmp_path / "repo"  # what the old default (REPO/docs/results) would have overwritten
    monkeypatch.setattr(mod, "REPO", fake_repo)
    monkeypatch.setattr(mod, "train", lambda args, variant, seed: mod.run_dir(args, variant, seed))
    monkeypatch.setattr(mod, "val_curve", lambda rd: [{"step": 1, "tokens": 8, "flops": 1.0, "val_loss": 2.0}])
    monkeypatch.setattr(mod, "ner_scores", lambda rd: {})
    monkeypatch.setattr(mod, "plot", lambda results, runs, out: [])
    committed = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (REPO / "docs" / "results").iterdir()}
    runs = tmp_path / "runs"
    assert mod.main(["--runs", str(runs), "--seeds", "0", "--skip-eval"]) == 0
    assert (runs / "results" / "results.json").is_file() and (runs / "results" / "results.md").is_file()
    assert not (fake_repo / "docs").exists()
    assert mod.main(["--runs", str(runs), "--seeds", "0", "--skip-eval", "--out", str(tmp_path / "chosen")]) == 0
    assert (tmp_path / "chosen" / "results.md").is_file()
    assert committed == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (REPO / "docs" / "results").iterdir()}
