"""One structured configuration schema for everything metalm runs.

A config is a YAML file merged onto these dataclasses in OmegaConf struct mode, then `key=value`
overrides. Unknown keys, wrong types and impossible values are errors that name the key and the value,
raised before any work starts. YAML is read as data only: OmegaConf's `${...}` interpolation and custom
resolvers are rejected, so a config file can never run code or read the environment.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem, with the offending key and value in the message."""


@dataclass
class ModelConfig:
    d_model: int = 96
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 4
    ffn_hidden: int = 384  # SwiGLU inner width (the paper: 4 x d_model)
    vocab_size: int = 50304  # OLMo/GPT-NeoX tokenizer padded to a multiple of 128
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    activation_checkpointing: bool = False
    kernels: str = "auto"  # auto: Triton on CUDA tensors, torch reference elsewhere | triton | torch
    fused_linear_ce: bool = False  # AR loss through kernels.linear_cross_entropy (no full logits)


@dataclass
class DataConfig:
    shards: str = "data/wiki-vital/shards"  # directory holding manifest.json and shard-*.tar
    source: str = "builtin"  # what `prepare_if_missing` tokenizes: builtin | a path/glob (jsonl, txt, parquet, HF dir)
    text_field: str = "text"
    tokenizer: str = "builtin:olmo"  # tokenizers JSON, HF folder, hub name, or builtin:olmo
    prepare_if_missing: bool = True
    val_fraction: float = 0.01
    samples_per_shard: int = 2048
    num_workers: int = 0
    shuffle: bool = True
    on_bad_sample: str = "error"  # error | skip (skipped samples are counted in the logs)
    text_split: str = "file"  # plain-text sources: file (one document per file) | blank_line (blank-line separated)
    prepare_num_proc: int = 0  # tokenizer processes for prepare_if_missing (0: one per available core)
    verify_shards: bool = True  # check each shard's sha256 against the manifest when the loader reads it


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 2500
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio for cosine / linear
    grad_clip: float = 1.0  # 0 disables


@dataclass
class TrainConfig:
    run_dir: str = "runs/cpu-tiny"
    seed: int = 0
    max_steps: int = 1000
    stop_at: int = 0  # >0: checkpoint and exit after this step (schedule still follows max_steps)
    seq_len: int = 2048
    global_batch: int = 1024  # sequences per optimizer step, all ranks together
    micro_batch: int = 8  # sequences per rank per forward
    grad_accum: int = 0  # 0: derived as global_batch / (micro_batch * world_size)
    precision: str = "bf16"  # fp32 | bf16 | fp16
    zero_stage: int = 2
    log_every: int = 10
    val_every: int = 0  # 0 disables periodic validation
    val_batches: int = 8
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    nonfinite_policy: str = "skip"  # non-finite loss on any rank: skip (update not applied, counted) | stop (exit 1)
    max_nonfinite_in_row: int = 5  # skip: this many non-finite steps in a row stop the run (exit 1)
    spike_window: int = 100  # steps of loss history for loss-spike detection (0 disables)
    spike_sigma: float = 6.0  # a step loss above mean + spike_sigma x std of the window is logged as a loss_spike


@dataclass
class MetaHeadConfig:
    layers: int = 4  # Linear layers in the MLP head, the last one projecting onto the vocabulary rows
    hidden: int = 128
    dropout: float = 0.1
    init: str = "xavier"  # xavier | normal


@dataclass
class MetaConfig:
    enabled: bool = True
    hybrid_ratio: float = 0.5  # probability that an optimizer step is a meta step
    branch: str = "per_step"  # per_step | per_microbatch (the paper code's draw)
    sampler: str = "smlmt"  # smlmt (ours) | reference (the paper code's construction)
    n_way: int = 32
    k_shot: int = 4
    q_queries: int = 4  # query occurrences per class (smlmt; the reference sampler takes one per sequence)
    inner_steps: int = 10
    inner_lr: float = 0.01
    head_init: str = "persistent"  # persistent | zero | prototype
    second_order: bool = False
    min_token_freq: int = 2  # eligible classes occur at least this often in the batch
    max_token_freq: int = 0  # 0: no upper bound
    head: MetaHeadConfig = field(default_factory=MetaHeadConfig)


@dataclass
class CheckpointConfig:
    every: int = 500
    keep_last_k: int = 3
    resume: str = "auto"  # auto (from latest if present) | never | a checkpoint path
    save_on_signal: bool = True
    export_weights: bool = True  # consolidated safetensors beside the DeepSpeed state (for the evaluator)
    checksums: bool = True  # sha256 of every file in the COMPLETE marker (sizes always), verified before resuming
    check_free_space: bool = True  # refuse to start, or skip a save, when the disk cannot hold one more checkpoint
    max_failed_saves: int = 1  # consecutive failed saves tolerated (retried at the next interval); one more stops


@dataclass
class LoggingConfig:
    wandb: bool = True
    project: str = "metalm"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    tags: list = field(default_factory=list)
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline
    progress: bool = True


@dataclass
class NerConfig:
    train: Optional[str] = None
    dev: Optional[str] = None
    test: Optional[str] = None
    mode: str = "head"  # head | full
    lr: float = 3e-5
    epochs: int = 10
    batch_size: int = 16
    max_len: int = 128
    weight_decay: float = 0.0
    seed: int = 42
    crf: bool = False
    early_stopping: bool = False
    patience: int = 3  # early stopping: epochs without a dev-F1 improvement before stopping
    log_every: int = 10  # fine-tuning loss logged every N steps (t90 / AUC resolution)
    token_col: int = 1  # IOB2 columns (0-based): UNER files are index, token, tag, ...
    tag_col: int = 2
    max_sentences: int = 0  # 0: all; else the first N sentences of each file (quick checks)
    word_sep: str = " "  # put before every word but the first when encoding; "" for ja/zh (no spaces in text)
    label_token: str = "first"  # sub-token carrying a word's label: first (paper) | last (sees the whole word)
    langs: list = field(default_factory=list)  # [{lang, train, test, dev?}, ...]: in-language runs + average
    crosslingual: bool = False  # with langs: also test each model on every language's test set


@dataclass
class EvalConfig:
    batch_size: int = 8
    seq_len: int = 256
    val_batches: int = 16
    metrics: list = field(default_factory=lambda: ["val_loss", "rank", "entropy"])
    probe_text: Optional[str] = None  # text/jsonl file for the fixed rank/entropy batch when no val shards
    ner: NerConfig = field(default_factory=NerConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "model.kernels": ("auto", "triton", "torch"),
    "data.on_bad_sample": ("error", "skip"),
    "data.text_split": ("file", "blank_line"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.nonfinite_policy": ("skip", "stop"),
    "meta.branch": ("per_step", "per_microbatch"),
    "meta.sampler": ("smlmt", "reference"),
    "meta.head_init": ("persistent", "zero", "prototype"),
    "meta.head.init": ("xavier", "normal"),
    "logging.mode": ("auto", "online", "offline"),
    "eval.ner.mode": ("head", "full"),
    "eval.ner.label_token": ("first", "last"),
}


EVAL_METRICS = ("val_loss", "rank", "entropy", "ner")


def _reject_interpolation(node: Any, where: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_interpolation(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _reject_interpolation(v, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise ConfigError(f"{where}={node!r}: interpolation ('${{...}}') is not allowed in metalm configs")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    _reject_interpolation(data, "")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. train.max_steps=100)")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("+")
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={raw!r}: value is not valid YAML: {e}") from None
    _reject_interpolation(value, key)
    return key, value


def _merge(base: DictConfig, data: dict, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{origin}: key {key!r}: {_reason(e)}") from None


def _reason(e: OmegaConfBaseException) -> str:
    msg = str(e).split("\n")[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return f"unknown key ({msg})"
    return msg


def _set_override(cfg: DictConfig, key: str, value: Any) -> None:
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {key}={value!r}: {_reason(e)}") from None


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check values that the types alone cannot; raise ConfigError naming key and value."""
    m, t, me, o = cfg.model, cfg.train, cfg.meta, cfg.optim

    def bad(key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{key}={value!r}: {expected}")

    for key, allowed in CHOICES.items():
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node not in allowed:
            bad(key, node, f"expected one of {', '.join(allowed)}")
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size", "max_seq_len"):
        if getattr(m, key) <= 0:
            bad(f"model.{key}", getattr(m, key), "expected a positive integer")
    if m.d_model % m.n_heads:
        bad("model.d_model", m.d_model, f"must be divisible by model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        bad("model.d_model", m.d_model, f"head dim d_model/n_heads={m.d_model // m.n_heads} must be even for RoPE")
    if m.n_heads % m.n_kv_heads:
        bad("model.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads={m.n_heads}")
    if m.norm_eps <= 0:
        bad("model.norm_eps", m.norm_eps, "expected > 0")
    if t.seq_len <= 0 or t.seq_len > m.max_seq_len:
        bad("train.seq_len", t.seq_len, f"expected 1..model.max_seq_len={m.max_seq_len}")
    if t.max_steps <= 0:
        bad("train.max_steps", t.max_steps, "expected a positive integer")
    if t.stop_at < 0:
        bad("train.stop_at", t.stop_at, "expected 0 (off) or a step number")
    if t.micro_batch <= 0:
        bad("train.micro_batch", t.micro_batch, "expected a positive integer")
    if t.zero_stage not in (0, 1, 2, 3):
        bad("train.zero_stage", t.zero_stage, "expected 0, 1, 2 or 3")
    if t.log_every <= 0:
        bad("train.log_every", t.log_every, "expected a positive integer")
    if t.max_nonfinite_in_row < 1:
        bad("train.max_nonfinite_in_row", t.max_nonfinite_in_row, "expected a positive integer")
    if t.spike_window < 0:
        bad("train.spike_window", t.spike_window, "expected >= 0 (0 disables loss-spike detection)")
    if not t.spike_sigma > 0:
        bad("train.spike_sigma", t.spike_sigma, "expected > 0")
    if world_size is not None:
        accum = grad_accum(cfg, world_size)
        if t.micro_batch * accum * world_size != t.global_batch:
            bad(
                "train.global_batch",
                t.global_batch,
                f"must equal train.micro_batch ({t.micro_batch}) x train.grad_accum ({accum}) x world size "
                f"({world_size}) = {t.micro_batch * accum * world_size}",
            )
    if not 0.0 <= me.hybrid_ratio <= 1.0:
        bad("meta.hybrid_ratio", me.hybrid_ratio, "expected a probability in [0, 1]")
    for key in ("n_way", "k_shot", "q_queries", "inner_steps"):
        if getattr(me, key) <= 0:
            bad(f"meta.{key}", getattr(me, key), "expected a positive integer")
    if me.n_way < 2:
        bad("meta.n_way", me.n_way, "expected at least 2 ways")
    if me.inner_lr <= 0:
        bad("meta.inner_lr", me.inner_lr, "expected > 0")
    if me.head.layers < 1 or me.head.hidden <= 0:
        bad("meta.head.layers", me.head.layers, "expected >= 1 layer with meta.head.hidden > 0")
    if not 0.0 <= me.head.dropout < 1.0:
        bad("meta.head.dropout", me.head.dropout, "expected a probability in [0, 1)")
    if me.min_token_freq < 1:
        bad("meta.min_token_freq", me.min_token_freq, "expected >= 1")
    if me.max_token_freq and me.max_token_freq < me.min_token_freq:
        bad("meta.max_token_freq", me.max_token_freq, f"must be 0 or >= meta.min_token_freq={me.min_token_freq}")
    if o.lr <= 0:
        bad("optim.lr", o.lr, "expected > 0")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        bad("optim.betas", list(o.betas), "expected two numbers in [0, 1)")
    if o.warmup_steps < 0:
        bad("optim.warmup_steps", o.warmup_steps, "expected >= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        bad("optim.min_lr_ratio", o.min_lr_ratio, "expected a ratio in [0, 1]")
    if o.grad_clip < 0:
        bad("optim.grad_clip", o.grad_clip, "expected >= 0 (0 disables clipping)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        bad("data.val_fraction", cfg.data.val_fraction, "expected a fraction in [0, 1)")
    if cfg.data.samples_per_shard <= 0:
        bad("data.samples_per_shard", cfg.data.samples_per_shard, "expected a positive integer")
    if cfg.data.num_workers < 0:
        bad("data.num_workers", cfg.data.num_workers, "expected >= 0 (0: load in the training process)")
    if cfg.data.prepare_num_proc < 0:
        bad("data.prepare_num_proc", cfg.data.prepare_num_proc, "expected >= 0 (0: one per available core)")
    if cfg.checkpoint.every <= 0:
        bad("checkpoint.every", cfg.checkpoint.every, "expected a positive integer")
    if cfg.checkpoint.keep_last_k < 1:
        bad("checkpoint.keep_last_k", cfg.checkpoint.keep_last_k, "expected >= 1")
    if cfg.checkpoint.max_failed_saves < 0:
        bad("checkpoint.max_failed_saves", cfg.checkpoint.max_failed_saves,
            "expected >= 0 (0: stop at the first failed save)")
    ev, ner = cfg.eval, cfg.eval.ner
    for key in ("batch_size", "seq_len", "val_batches"):
        if getattr(ev, key) <= 0:
            bad(f"eval.{key}", getattr(ev, key), "expected a positive integer")
    for mname in ev.metrics:
        if mname not in EVAL_METRICS:
            bad("eval.metrics", list(ev.metrics), f"unknown metric {mname!r}; expected some of {', '.join(EVAL_METRICS)}")
    for key in ("epochs", "batch_size", "max_len", "log_every", "patience"):
        if getattr(ner, key) <= 0:
            bad(f"eval.ner.{key}", getattr(ner, key), "expected a positive integer")
    if ner.lr <= 0:
        bad("eval.ner.lr", ner.lr, "expected > 0")
    for i, entry in enumerate(ner.langs):
        if not hasattr(entry, "keys") or not all(entry.get(k) for k in ("lang", "train", "test")):
            bad(f"eval.ner.langs[{i}]", entry, "expected a mapping with lang, train, test (and optionally dev)")


def grad_accum(cfg: Config, world_size: int) -> int:
    """Gradient accumulation steps: explicit, or derived from the global batch."""
    t = cfg.train
    if t.grad_accum > 0:
        return t.grad_accum
    per_step = t.micro_batch * world_size
    if t.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={t.global_batch}: not divisible by train.micro_batch ({t.micro_batch}) x world "
            f"size ({world_size}) = {per_step}; change the batch sizes or set train.grad_accum"
        )
    return t.global_batch // per_step


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """Merge YAML `path` (optional) and `key=value` overrides onto the schema and validate.

    `world_size` (when given) also checks micro_batch x grad_accum x world_size == global_batch.
    Returns a typed `Config` object (an OmegaConf structured config).
    """
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path)), f"config file {path}")
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_override(cfg, key, value)
    config: Config = cfg  # type: ignore[assignment]
    validate(config, world_size)
    return config


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(cfg)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON config, derived from ours (never written by hand)."""
    t = cfg.train
    accum = grad_accum(cfg, world_size)
    ds: dict[str, Any] = {
        "train_batch_size": t.micro_batch * accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": int(t.zero_stage)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.zero_stage >= 2:
        ds["zero_optimization"].update({"overlap_comm": False, "contiguous_gradients": True})
    if t.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    return ds
