from pathlib import Path

import pytest

from metalm.config import ConfigError, grad_accum, load_config, to_yaml
from metalm.model import num_params

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_every_shipped_yaml_loads():
    assert len(CONFIGS) >= 5
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.model.d_model % cfg.model.n_heads == 0, path


@pytest.mark.parametrize("name,millions", [("11m", 11.28), ("65m", 64.60), ("181m", 181.10), ("570m", 569.81)])
def test_size_configs_match_their_names(name, millions):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    # the paper's table (PAPER.md section 2): untied embeddings, V=50,304
    assert num_params(cfg.model) / 1e6 == pytest.approx(millions, abs=0.01)
    assert (cfg.model.n_layers, cfg.model.n_heads, cfg.model.n_kv_heads) == (12, 12, 4)
    assert cfg.model.ffn_hidden == 4 * cfg.model.d_model
    assert cfg.train.global_batch == 1024 and cfg.train.seq_len == 2048
    assert cfg.meta.enabled and cfg.optim.lr == 3e-4 and cfg.optim.warmup_steps == 2500


def test_cpu_tiny_is_small_and_meta_on():
    cfg = load_config(REPO / "configs" / "cpu-tiny.yaml")
    assert 1e6 <= num_params(cfg.model) <= 3e6
    assert cfg.meta.enabled


def test_overrides_apply_and_are_typed():
    cfg = load_config(None, ["train.max_steps=7", "meta.hybrid_ratio=0.25", "logging.tags=[a,b]"])
    assert cfg.train.max_steps == 7 and cfg.meta.hybrid_ratio == 0.25 and list(cfg.logging.tags) == ["a", "b"]


@pytest.mark.parametrize("override,needle", [
    ("train.no_such_key=1", "no_such_key"),
    ("nosection.x=1", "nosection"),
    ("train.max_steps=abc", "train.max_steps"),
    ("model.d_model=100", "model.d_model=100"),
    ("meta.hybrid_ratio=1.5", "meta.hybrid_ratio=1.5"),
    ("meta.sampler=bogus", "meta.sampler='bogus'"),
    ("train.zero_stage=4", "train.zero_stage=4"),
    ("model.n_kv_heads=5", "model.n_kv_heads=5"),
    ("train.seq_len=4096", "train.seq_len=4096"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.max_steps", "key=value"),
])
def test_bad_values_name_key_and_value(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "max_step" in str(e.value) and str(p) in str(e.value)


def test_interpolation_is_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  run_dir: ${oc.env:HOME}\n")
    with pytest.raises(ConfigError, match="interpolation"):
        load_config(p)
    with pytest.raises(ConfigError, match="interpolation"):
        load_config(None, ["train.run_dir=${oc.env:HOME}"])


def test_yaml_tags_cannot_construct_objects(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_batch_geometry_checked_against_world_size():
    cfg = load_config(None, ["train.global_batch=64", "train.micro_batch=8"], world_size=2)
    assert grad_accum(cfg.train, 2) == 4
    with pytest.raises(ConfigError, match="train.global_batch=64"):
        load_config(None, ["train.global_batch=64", "train.micro_batch=8", "train.grad_accum=3"], world_size=2)
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(None, ["train.global_batch=60", "train.micro_batch=8"], world_size=2)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "cpu-tiny.yaml", ["train.max_steps=3"])
    p = tmp_path / "saved.yaml"
    p.write_text(to_yaml(cfg))
    again = load_config(p)
    assert to_yaml(again) == to_yaml(cfg)


def test_every_section_has_a_checker_and_every_choice_key_exists():
    import dataclasses

    from metalm import config

    sections, keys = set(), set()

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                sections.add(prefix + f.name)
                walk(type(default), prefix + f.name + ".")
            else:
                keys.add(prefix + f.name)

    walk(config.Config, "")
    assert set(config.SECTION_CHECKS) == sections
    assert set(config.CHOICES) <= keys
    defaults = load_config(None)
    for key, allowed in config.CHOICES.items():  # each default is one of its own choices
        node = defaults
        for part in key.split("."):
            node = getattr(node, part)
        assert node in allowed, key


def test_consumers_share_the_allowed_values():
    from metalm import config
    from metalm.meta import fomaml, schedule, tasks

    assert schedule.BRANCHES is config.META_BRANCHES
    assert tasks.SAMPLERS is config.META_SAMPLERS
    assert fomaml.HEAD_INITS is config.HEAD_INITS
    assert config.CHOICES["meta.head.init"] is config.HEAD_WEIGHT_INITS
    assert config.CHOICES["data.on_bad_sample"] is config.ON_BAD_SAMPLE
    assert not hasattr(config, "world_size_from_env")


@pytest.mark.parametrize("override,message", [
    ("model.kernels=cuda", "model.kernels='cuda': expected one of auto, triton, torch"),
    ("meta.head.init=kaiming", "meta.head.init='kaiming': expected one of xavier, normal"),
    ("eval.ner.label_token=middle", "eval.ner.label_token='middle': expected one of first, last"),
    ("train.global_batch=0", "train.global_batch=0: expected a positive integer"),
    ("train.grad_accum=-1", "train.grad_accum=-1: expected >= 0"),
    ("train.val_batches=0", "train.val_batches=0: expected a positive integer"),
    ("meta.inner_lr=0", "meta.inner_lr=0.0: expected a finite number > 0"),
    ("train.collective_timeout=0", "train.collective_timeout=0.0: expected a finite number > 0"),
    ("train.collective_timeout=inf", "train.collective_timeout=inf: expected a finite number > 0"),
])
def test_section_checks_keep_their_messages(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("override,key", [
    ("train.nonfinite_policy=ignore", "train.nonfinite_policy"),
    ("train.max_nonfinite_in_row=0", "train.max_nonfinite_in_row"),
    ("train.spike_window=-1", "train.spike_window"),
    ("train.spike_sigma=0", "train.spike_sigma"),
    ("checkpoint.max_failed_saves=-1", "checkpoint.max_failed_saves"),
    ("checkpoint.checksums=maybe", "checkpoint.checksums"),
])
def test_bad_reliability_settings_are_refused_naming_the_key(override, key):
    from metalm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])
