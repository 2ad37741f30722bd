"""Exports of checkpoints: the Hugging Face folder (model, generation config, tokenizer, all written by transformers)
and DeepSpeed's own zero_to_fp32.py run on a metalm checkpoint as docs/exporting.md says.

The checkpoints come from real 1-process training runs (2 steps of a small cpu-tiny model on the shared shards).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import cpu_run_env

from metalm import checkpoint as ckpt
from metalm.config import ModelConfig
from metalm.export.hf import export_checkpoint, export_model
from metalm.export.hf import main as export_main
from metalm.model import build_model

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"
TINY_RUN = ["--config", str(REPO / "configs" / "cpu-tiny.yaml"), "train.seq_len=64", "model.max_seq_len=64",
            "model.n_layers=2", "train.micro_batch=4", "train.global_batch=8", "train.max_steps=2",
            "train.log_every=1", "train.val_every=0", "checkpoint.every=2", "logging.wandb=false",
            "logging.progress=false", "data.prepare_if_missing=false", "meta.n_way=4", "meta.k_shot=2",
            "meta.q_queries=2", "meta.inner_steps=2"]


def train_tiny(shards: Path, root: Path, *extra: str) -> Path:
    """The latest checkpoint of a 2-step single-process run started in `root` (its working directory)."""
    run = root / "run"
    cmd = [sys.executable, str(LAUNCHER), *TINY_RUN, f"data.shards={shards}", f"train.run_dir={run}", *extra]
    out = subprocess.run(cmd, cwd=root, env=cpu_run_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    latest = ckpt.find_latest(run / "checkpoints")
    assert latest is not None and latest.name == "step_00000002"
    return latest


@pytest.fixture(scope="module")
def tied_ckpt(shards, tmp_path_factory) -> Path:
    return train_tiny(shards, tmp_path_factory.mktemp("tied"))  # cpu-tiny ties its embeddings


@pytest.fixture(scope="module")
def untied_ckpt(shards, tmp_path_factory) -> Path:
    return train_tiny(shards, tmp_path_factory.mktemp("untied"), "model.tie_embeddings=false")


@pytest.fixture(scope="module")
def exported(tied_ckpt, tmp_path_factory) -> Path:
    """The tied checkpoint exported through the CLI from another working directory than the run's."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    out = elsewhere / "hf"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        assert export_main([str(tied_ckpt), "--out", "hf"]) == 0
    return out


# ================================================================================ the model alone


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_as_plain_llama_with_same_logits(tmp_path, tie):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=211,
                      max_seq_len=32, tie_embeddings=tie)
    model = build_model(cfg).eval()
    export_model(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf) is LlamaForCausalLM
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tie
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


# ================================================================================ a real checkpoint


def test_exported_folder_is_written_by_transformers(exported, tied_ckpt):
    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    special = ckpt.read_state(tied_ckpt).special_ids
    assert special == {"bos": 50279, "eos": 50279, "pad": 1, "mask": 50280}  # the OLMo tokenizer's, + mask
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llama" and "transformers_version" in config  # LlamaConfig.save_pretrained
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (50279, 50279, 1)
    gen = json.loads((exported / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (50279, 50279, 1)
    tok_cfg = json.loads((exported / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"], tok_cfg["mask_token"]) == \
        ("<|endoftext|>", "<|endoftext|>", "<|padding|>", "<|mask|>")


def test_exported_model_matches_metalm_logits(exported, tied_ckpt):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ours, _ = ckpt.load_model(tied_ckpt)
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf) is LlamaForCausalLM
    ids = torch.randint(0, 50281, (3, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours.eval()(ids), hf(ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_exported_tokenizer_pads_and_encodes_like_training(exported, tied_ckpt):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (50279, 50279, 1, 50280)
    batch = tok(["a b", "a longer text"], padding=True, return_tensors="pt")
    raw = Tokenizer.from_file(str(tied_ckpt / "tokenizer.json"))
    short, long = (raw.encode(t, add_special_tokens=False).ids for t in ("a b", "a longer text"))
    assert len(short) < len(long)
    pad = [1] * (len(long) - len(short))  # on the left, for generation
    assert batch["input_ids"].tolist() == [pad + short, long]  # no BOS added: training encoded documents as is
    assert batch["attention_mask"].tolist() == [[0] * len(pad) + [1] * len(short), [1] * len(long)]


def test_batched_generation_pads_left_and_stops_at_eos(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    tok = AutoTokenizer.from_pretrained(exported)
    prompts = ["a b", "a longer text"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        free = hf.generate(**batch, max_new_tokens=6, do_sample=False)
        alone = hf.generate(**tok(prompts[:1], return_tensors="pt"), max_new_tokens=6, do_sample=False)
    short = int(batch["attention_mask"][0].sum())
    assert free[0, width - short:].tolist() == alone[0].tolist()  # left padding + attention mask change nothing
    # make the first token row 0 generates the EOS: that row stops there, and is filled with the pad id
    stop = int(free[0, width])
    with torch.no_grad():
        ended = hf.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=stop)
    for row in range(2):
        new = free[row, width:].tolist()
        cut = new[: new.index(stop) + 1] if stop in new else new
        got = ended[row, width:].tolist()
        assert got == cut + [tok.pad_token_id] * (len(got) - len(cut)), (row, got, new)
    assert ended[0, width:].tolist()[0] == stop and set(ended[0, width + 1:].tolist()) <= {tok.pad_token_id}


def test_text_generation_pipeline_runs_a_batch(exported):
    import transformers

    pipe = transformers.pipeline("text-generation", model=str(exported), tokenizer=str(exported), device="cpu")
    prompts = ["Hello", "The capital of France is"]
    out = pipe(prompts, batch_size=2, max_new_tokens=4, do_sample=False)
    assert len(out) == 2
    for prompt, res in zip(prompts, out):
        assert res[0]["generated_text"].startswith(prompt) and len(res[0]["generated_text"]) > len(prompt)


def _with_state(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint `src` (without the DeepSpeed state) whose trainer_state.json has `changes`. The
    export verifies against the marker only the files it loads (config.yaml, model.safetensors)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ds", "*.pt", "zero_to_*.py"))
    state = json.loads((dst / "trainer_state.json").read_text())
    state.update(changes)
    (dst / "trainer_state.json").write_text(json.dumps(state))
    return dst


def test_special_ids_come_from_the_checkpoint_not_the_shards(tied_ckpt, tmp_path):
    moved = _with_state(tied_ckpt, tmp_path / "ck", data_shards=str(tmp_path / "gone"))  # shards deleted since
    out = export_checkpoint(moved, tmp_path / "hf")
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 1
    assert json.loads((out / "tokenizer_config.json").read_text())["mask_token"] == "<|mask|>"


def test_older_checkpoints_fall_back_to_the_manifest(tied_ckpt, shards, tmp_path):
    old = _with_state(tied_ckpt, tmp_path / "ck", special_ids={}, data_shards=str(shards))
    out = export_checkpoint(old, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 50279
    assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == "<|padding|>"


def test_an_id_the_tokenizer_does_not_have_is_refused(tied_ckpt, tmp_path, capsys):
    bad = _with_state(tied_ckpt, tmp_path / "ck", special_ids={"bos": 50279, "eos": 50279, "pad": 99999})
    assert export_main([str(bad), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "metalm-export: error:" in err and "pad token id 99999" in err
    assert not (tmp_path / "hf").exists()  # refused before anything was written


# ================================================================================ DeepSpeed's zero_to_fp32.py


def _documented_commands() -> list[str]:
    """The `python zero_to_fp32.py ...` and `python -c ...` lines of the zero_to_fp32 section of docs/exporting.md."""
    text = (REPO / "docs" / "exporting.md").read_text()
    section = text.split("## DeepSpeed's zero_to_fp32.py", 1)[1].split("\n## ", 1)[0]
    lines = [ln.split("  #", 1)[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
             for ln in block.splitlines()]
    return [ln for ln in lines if ln.startswith("python ")]


def _run_documented(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=cpu_run_env(), capture_output=True, text=True,
                          timeout=300)


def _copy_for_conversion(ck: Path, dst: Path) -> Path:
    if not (ck / "zero_to_fp32.py").is_file():
        pytest.skip("DeepSpeed did not copy zero_to_fp32.py into the checkpoint (an older or newer DeepSpeed)")
    return Path(shutil.copytree(ck, dst))


def _assert_same_weights(converted: dict, ck: Path) -> None:
    from safetensors.torch import load_file

    lm, head = load_file(str(ck / "model.safetensors")), load_file(str(ck / "meta_head.safetensors"))
    expected = {**{f"lm.{k}": v for k, v in lm.items()}, **{f"head.{k}": v for k, v in head.items()}}
    for name, tensor in expected.items():
        assert torch.equal(converted[name], tensor), name


def test_zero_to_fp32_on_a_tied_checkpoint_as_documented(tied_ckpt, tmp_path):
    commands = _documented_commands()
    plain = [c for c in commands if "zero_to_fp32.py" in c and "--safe_serialization" not in c]
    snippet = [c for c in commands if c.startswith("python -c")]
    assert len(plain) == 1 and len(snippet) == 1, commands
    step = _copy_for_conversion(tied_ckpt, tmp_path / "step")
    res = _run_documented(plain[0], step)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = step / shlex.split(plain[0])[3]
    converted = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert converted["lm.lm_head.weight"].data_ptr() == converted["lm.model.embed_tokens.weight"].data_ptr()
    _assert_same_weights(converted, step)
    res = _run_documented(snippet[0], step)  # the safetensors route for tied embeddings
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    from safetensors.torch import load_file

    written = sorted(step.glob("*.safetensors"))
    new = [p for p in written if p.name not in ("model.safetensors", "meta_head.safetensors")]
    assert len(new) == 1, written
    converted = load_file(str(new[0]))
    assert "lm.lm_head.weight" not in converted  # tied: stored once, as the embedding
    _assert_same_weights(converted, step)


def test_zero_to_fp32_safe_serialization_on_an_untied_checkpoint_as_documented(untied_ckpt, tmp_path):
    from safetensors.torch import load_file

    safe = [c for c in _documented_commands() if "zero_to_fp32.py" in c and "--safe_serialization" in c]
    assert len(safe) == 1
    step = _copy_for_conversion(untied_ckpt, tmp_path / "step")
    res = _run_documented(safe[0], step)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    converted = load_file(str(step / shlex.split(safe[0])[3] / "model.safetensors"))
    assert not torch.equal(converted["lm.lm_head.weight"], converted["lm.model.embed_tokens.weight"])
    _assert_same_weights(converted, step)


@pytest.mark.parametrize("form", ["run", "checkpoints", "latest"])
def test_a_run_its_checkpoints_or_latest_exports_the_newest_complete_checkpoint(tied_ckpt, tmp_path, form, capsys):
    """metalm-export given a run directory, its checkpoints/ directory or `latest` exports the checkpoint `latest`
    names, not a newer interrupted save; where there is none, a one-line error that says so."""
    run = tmp_path / "run"
    shutil.copytree(tied_ckpt.parent.parent, run)
    interrupted = run / "checkpoints" / "step_00000004"
    shutil.copytree(tied_ckpt, interrupted)
    (interrupted / ckpt.MARKER).unlink()
    given = {"run": run, "checkpoints": run / "checkpoints", "latest": run / "checkpoints" / "latest"}[form]
    assert export_main([str(given), "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.startswith(f"exported {run / 'checkpoints' / 'step_00000002'} -> ")
    assert (tmp_path / "hf" / "config.json").is_file()
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    assert export_main([str(given), "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"metalm-export: error: {given}: no complete checkpoint in {run / 'checkpoints'} (1 step "
                   f"directories, none with a COMPLETE marker whose files are all there)")
    assert not (tmp_path / "hf2").exists()
