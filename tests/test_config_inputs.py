"""Hostile or broken config input: every case is one clear ConfigError line, quickly, never a traceback or a hang.

`load_config` also reads the `config.yaml` of every checkpoint the evaluator picks up, so these are the
evaluator's defences too.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from deadline import deadline
from metalm.config import MAX_STRING_CHARS, Config, ConfigError, load_config, validate
from metalm.config_yaml import MAX_CONFIG_BYTES, MAX_YAML_DEPTH

REPO = Path(__file__).resolve().parents[1]


def refused(path=None, overrides=None, seconds: float = 5.0) -> str:
    """The message of the ConfigError that load_config raises, checked to be a single line."""
    with deadline(seconds), pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


# ------------------------------------------------------------------------------------ 1. anchors, depth, size

# 9 anchors, each a list of 9 aliases of the previous one: 9**9 (387 million) strings once expanded, in 0.5 KB
BOMB = "logging:\n  tags:\n" + "    - &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))


def test_alias_bomb_in_a_file_is_refused_at_once(tmp_path):
    assert len(BOMB) < 1024
    msg = refused(write(tmp_path, BOMB), seconds=2)
    assert str(tmp_path / "c.yaml") in msg and "line 3" in msg
    assert "anchors and aliases" in msg


def test_any_anchor_or_alias_is_refused(tmp_path):
    msg = refused(write(tmp_path, "train:\n  run_dir: &d runs/x\nlogging:\n  run_name: *d\n"))
    assert "line 2" in msg and "anchors and aliases" in msg
    msg = refused(overrides=["logging.tags=[&a [x, x], *a]"])
    assert "logging.tags" in msg and "anchors and aliases" in msg


def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path):
    deep = "logging:\n  tags: " + "[" * 100_000 + "]" * 100_000 + "\n"
    msg = refused(write(tmp_path, deep))
    assert str(tmp_path / "c.yaml") in msg and f"nested deeper than {MAX_YAML_DEPTH}" in msg
    msg = refused(overrides=["logging.tags=" + "[" * 200 + "]" * 200])
    assert "logging.tags" in msg and f"nested deeper than {MAX_YAML_DEPTH}" in msg


def test_nesting_within_the_bound_still_loads():
    cfg = load_config(None, ["eval.ner.langs=[{lang: en, train: a, test: b}]"])
    assert cfg.eval.ner.langs[0].lang == "en"


def test_oversized_file_is_refused_before_parsing(tmp_path):
    p = write(tmp_path, "# " + "x" * MAX_CONFIG_BYTES + "\n")
    msg = refused(p, seconds=2)
    assert str(p) in msg and f"{MAX_CONFIG_BYTES + 3} bytes" in msg and "at most" in msg


def test_a_huge_number_of_values_is_refused_quickly(tmp_path):
    # 100k list items in 300 KB: within the size bound, but a config has a few hundred values
    msg = refused(write(tmp_path, "logging:\n  tags: [" + "x, " * 100_000 + "]\n"), seconds=3)
    assert "values" in msg and "at most" in msg


def test_unreadable_path_is_a_config_error(tmp_path):
    msg = refused(tmp_path)  # a directory
    assert str(tmp_path) in msg


# ------------------------------------------------------------------------------------ 2. encoding


def test_non_utf8_file_names_the_file(tmp_path):
    p = write(tmp_path, b"train:\n  run_dir: caf\xe9\n")
    msg = refused(p)
    assert str(p) in msg and "UTF-8" in msg and "line 2" in msg


# ------------------------------------------------------------------------------------ 3. integers


@pytest.mark.parametrize("override,needle", [
    ("train.seed=100000000000000000000000", "train.seed=100000000000000000000000: expected an integer in 0..2**63-1"),
    ("train.seed=9223372036854775808", "train.seed=9223372036854775808: expected an integer in 0..2**63-1"),
    ("train.seed=-1", "train.seed=-1: expected an integer in 0..2**63-1"),
    ("eval.ner.seed=18446744073709551616", "eval.ner.seed=18446744073709551616: expected an integer in 0..2**63-1"),
    ("train.seed=1e23", "train.seed"),
    ("train.max_steps=100000000000000000000", "train.max_steps=100000000000000000000: expected an integer that fits"),
    ("checkpoint.every=-100000000000000000000", "checkpoint.every"),
])
def test_integers_must_fit_in_64_bits(override, needle):
    assert needle in refused(overrides=[override])


def test_largest_seed_is_accepted():
    assert load_config(None, [f"train.seed={2**63 - 1}"]).train.seed == 2**63 - 1


def test_integer_too_long_to_parse_is_a_config_error(tmp_path):
    msg = refused(write(tmp_path, "train:\n  seed: " + "9" * 5000 + "\n"))
    assert str(tmp_path / "c.yaml") in msg and "digits" in msg
    assert "train.seed" in refused(overrides=["train.seed=" + "9" * 5000])


def test_seed_in_a_file(tmp_path):
    msg = refused(write(tmp_path, "train:\n  seed: 100000000000000000000000\n"))
    assert "train.seed=100000000000000000000000: expected an integer in 0..2**63-1" in msg


# ------------------------------------------------------------------------------------ 4. floats

@pytest.mark.parametrize("value,shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("1e400", "inf")])
def test_lr_must_be_finite(value, shown):
    assert f"optim.lr={shown}: expected a finite number > 0" in refused(overrides=[f"optim.lr={value}"])


def test_float_too_large_for_a_double_names_the_key(tmp_path):
    assert refused(overrides=["optim.lr=1" + "0" * 400]).startswith("override optim.lr=")
    msg = refused(write(tmp_path, "optim:\n  lr: 1" + "0" * 400 + "\n"))
    assert "key 'optim.lr'" in msg and "too large for a float" in msg


def _float_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += _float_keys(type(default), f"{prefix}{f.name}.")
        elif f.type in (float, "float"):
            keys.append(f"{prefix}{f.name}")
    return keys


FLOAT_KEYS = _float_keys()


def test_schema_has_float_fields():
    assert {"optim.lr", "model.rope_theta", "meta.head.dropout", "eval.ner.weight_decay"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_float_field_must_be_finite(key, value):
    msg = refused(overrides=[f"{key}={value}"])
    assert msg.startswith(f"{key}=") and "expected" in msg


def test_non_finite_floats_in_lists_are_refused():
    assert refused(overrides=["optim.betas=[.nan, 0.9]"]).startswith("optim.betas=")
    assert refused(overrides=["logging.tags=[a, .inf]"]) == "logging.tags[1]=inf: expected a finite number"


def test_validate_checks_a_config_built_in_code():
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(Config)
    cfg.model.rope_theta = float("nan")
    with pytest.raises(ConfigError, match=r"model.rope_theta=nan: expected a finite number"):
        validate(cfg)


# ------------------------------------------------------------------------------------ 5. string sizes


def test_absurd_string_override_is_refused_quickly():
    msg = refused(overrides=["logging.run_name=" + "x" * 10_000_000], seconds=3)
    assert "logging.run_name" in msg and "10000000 characters" in msg


def test_long_string_in_a_file_names_key_and_length(tmp_path):
    msg = refused(write(tmp_path, f"logging:\n  run_name: {'x' * 5000}\n"))
    assert msg == f"logging.run_name: a string of 5000 characters; expected at most {MAX_STRING_CHARS}"
    assert "logging.tags[0]: a string of 5000" in refused(overrides=[f"logging.tags=[{'y' * 5000}]"])


def test_nul_character_in_a_string_is_refused(tmp_path):
    msg = refused(write(tmp_path, 'train:\n  run_dir: "runs/a\\x00b"\n'))
    assert msg == "train.run_dir='runs/a\\x00b': expected text without NUL characters"


def test_string_at_the_bound_is_accepted():
    assert len(load_config(None, ["logging.run_name=" + "r" * MAX_STRING_CHARS]).logging.run_name) == MAX_STRING_CHARS


# ------------------------------------------------------------------------------------ 6. duplicate keys


def test_duplicate_key_names_key_and_both_lines(tmp_path):
    msg = refused(write(tmp_path, "train:\n  seed: 1\n  max_steps: 5\n  seed: 2\n"))
    assert str(tmp_path / "c.yaml") in msg
    assert "duplicate key 'train.seed' at line 4 (first at line 2)" in msg


def test_duplicate_section_is_an_error(tmp_path):
    msg = refused(write(tmp_path, "train:\n  seed: 1\nmodel:\n  d_model: 96\ntrain:\n  max_steps: 2\n"))
    assert "duplicate key 'train' at line 5 (first at line 1)" in msg


def test_duplicate_key_deep_in_a_list_and_in_an_override(tmp_path):
    text = "eval:\n  ner:\n    langs:\n      - lang: en\n        train: a\n        test: b\n        lang: fr\n"
    assert "duplicate key 'eval.ner.langs[0].lang' at line 7 (first at line 4)" in refused(write(tmp_path, text))
    msg = refused(overrides=["eval.ner.langs=[{lang: en, train: a, test: b, lang: fr}]"])
    assert msg.startswith("override eval.ner.langs=") and "duplicate key 'eval.ner.langs[0].lang'" in msg


# ------------------------------------------------------------------------------------ 7. empty run directory


@pytest.mark.parametrize("override", ["train.run_dir=", "train.run_dir=   ", "train.run_dir=''", "train.run_dir=' \t'"])
def test_empty_run_dir_is_refused(override):
    msg = refused(overrides=[override])
    assert msg.startswith("train.run_dir=") and msg.endswith(": expected a directory path or URL")


def test_empty_run_dir_in_a_file(tmp_path):
    assert "expected a directory path or URL" in refused(write(tmp_path, 'train:\n  run_dir: ""\n'))


# ------------------------------------------------------------------------------------ 8. Hydra's +key=value


@pytest.mark.parametrize("override", ["+train.seed=3", "++train.seed=3", " +train.seed=3"])
def test_plus_prefixed_override_is_explained(override):
    msg = refused(overrides=[override])
    assert "metalm has no '+'" in msg and "train.seed=3" in msg


# ------------------------------------------------------------------------------------ the launcher's view


def _pretrain_main():
    spec = importlib.util.spec_from_file_location("metalm_pretrain_launcher", REPO / "launchers" / "pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize("case", ["bomb", "deep", "non_utf8", "duplicate", "seed", "nan", "run_dir", "plus"])
def test_launcher_prints_one_line_and_exits_2(case, tmp_path, monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_PROCID",
                "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(REPO / "launchers"))  # pretrain.py imports dist_env from its own folder
    files = {"bomb": BOMB, "deep": "logging:\n  tags: " + "[" * 5000 + "]" * 5000 + "\n",
             "non_utf8": b"train:\n  run_dir: \xff\n", "duplicate": "train:\n  seed: 1\n  seed: 2\n"}
    overrides = {"seed": ["train.seed=100000000000000000000000"], "nan": ["optim.lr=.nan"],
                 "run_dir": ["train.run_dir="], "plus": ["+train.seed=1"]}
    path = write(tmp_path, files[case]) if case in files else REPO / "configs" / "cpu-tiny.yaml"
    with deadline(10):
        rc = _pretrain_main()(["--config", str(path), *overrides.get(case, [])])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("metalm: configuration error: ") and err.count("\n") == 1, err


def test_launcher_process_reports_the_bomb_without_a_traceback(tmp_path):
    p = write(tmp_path, BOMB)
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "pretrain.py"), "--config", str(p)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("metalm: configuration error: config file ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
