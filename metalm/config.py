"""One structured configuration schema for everything metalm runs.

A config is a YAML file merged onto these dataclasses in OmegaConf struct mode, then `key=value`
overrides. Unknown keys, wrong types and impossible values are errors that name the key and the value,
raised before any work starts. The file and the overrides are read by the hardened reader in
metalm/config_yaml.py (data only: no interpolation, anchors, duplicate keys or size bombs); every merged value
is then bounded here (finite floats, 64-bit integers, bounded strings without NUL).

Each section has its own checker (`SECTION_CHECKS`), and every set of allowed values is defined once, as a
module constant (`KERNEL_BACKENDS`, `META_SAMPLERS`, ...) that the code using the key imports.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metalm.config_yaml import ConfigError, parse_override, read_yaml_file, show



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
    shards: str = "data/wiki-vital/shards"  # directory or URL (s3://, gs://, https://, pipe:...) holding manifest.json
    source: str = "builtin"  # what `prepare_if_missing` tokenizes: builtin | path/glob or URL (jsonl/txt/parquet/HF)
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
    cache_dir: str = ""  # shards read from a URL: keep them in this local directory too ("" = in memory only)
    read_ahead: int = 2  # shards from a URL each loader worker downloads ahead of the one it reads (0: on demand)
    retries: int = 4  # a failed shard download is retried this many times (backoff 1 s, 2 s, ...), then a DataError
    record_samples: bool = False  # each rank appends the global ids of its train samples to RUN/samples/rank_N.jsonl


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 2500
    schedule: str = "cosine"  # after warm-up: cosine | linear | constant | wsd (warmup, stable, linear decay)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio for cosine / linear / wsd
    decay_fraction: float = 0.1  # wsd: fraction of the post-warm-up steps spent in the final linear decay
    grad_clip: float = 1.0  # 0 disables


@dataclass
class TrainConfig:
    run_dir: str = "runs/cpu-tiny"  # local directory, or a URL: then checkpoints go to RUN_URL/checkpoints
    local_dir: str = ""  # with a URL train.run_dir: the run's local directory ("" = runs/<last part of the URL>)
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
    max_nonfinite_in_window: int = 10  # skip: this many non-finite steps among the last nonfinite_window stop it too
    nonfinite_window: int = 100  # steps over which max_nonfinite_in_window counts
    spike_window: int = 100  # steps of loss history for loss-spike detection (0 disables)
    spike_sigma: float = 6.0  # a step loss above mean + spike_sigma x std of the window is logged as a loss_spike
    check_memory: bool = True  # refuse to start when a step's estimated peak memory exceeds what is available
    grad_stats_every: int = 0  # every N optimizer steps: per-layer gradient norms into metrics.jsonl (0: never)
    collective_timeout: float = 600.0  # seconds a rank waits for the others (rendezvous, any collective), then exits 1


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
    inner_lr: float = 0.5  # the paper: 0.01 (on raw, collapsed features); 0.5 suits standardised ones
    head_init: str = "zero"  # zero (output rows start at zero each episode) | persistent (paper) | prototype
    second_order: bool = False
    min_token_freq: int = 2  # eligible classes occur at least this often in the batch
    max_token_freq: int = 0  # 0: no upper bound
    classes: str = "any"  # any (every token type) | word_start (tokens that begin a word)
    readout: str = "prev"  # where the head reads: prev (the state before the mask) | after (readout_offset tokens
    # after it) | mask (the paper: the masked position, which a causal decoder cannot tell apart)
    readout_offset: int = 4  # readout=after: tokens between the mask and the state read (the right context seen)
    window: int = 32  # readout=after/prev: each occurrence gets its own window of this many tokens, one mask each
    feature_norm: str = "standardize"  # head inputs: standardize (support mean/std) | center | layernorm | none (paper)
    feature_grad_clip: float = 0.0  # > 0: clip the meta loss's gradient on the query features to this norm (0: off);
    # an absolute cap for the weighted path (meta.grad_ratio=0), refused with grad_ratio (whose rescaling undoes it)
    objective: str = "add"  # add (AR loss + loss_weight x meta loss) | replace (paper: a meta step replaces an AR step)
    loss_weight: float = 1.0  # objective=add with grad_ratio=0: weight of the query loss
    # The meta-gradient budget (objective=add, ZeRO 0-2): docs/meta-learning.md
    grad_ratio: float = 0.1  # meta part of the backbone gradient = this x the AR part's norm, per micro-batch (0: off)
    grad_ratio_start: int = 0  # optimizer steps before the meta gradient reaches the backbone at all
    grad_ratio_warmup: int = 0  # then a linear ramp from 0 to grad_ratio over this many steps
    grad_ratio_final: float = 1.0  # then a cosine anneal to this fraction of grad_ratio at train.max_steps (1: none)
    project: bool = False  # drop the meta gradient's component that opposes the AR gradient (one-sided PCGrad, exact)
    diag_every: int = 50  # every N optimizer steps: meta vs AR backbone gradient diagnostics (0: never)
    head: MetaHeadConfig = field(default_factory=MetaHeadConfig)


@dataclass
class CheckpointConfig:
    every: int = 500
    keep_last_k: int = 3
    resume: str = "auto"  # auto (from latest if present) | never | a checkpoint path
    allow_data_change: bool = False  # resume on shards other than the checkpoint's (same sample count), same position
    save_on_signal: bool = True
    export_weights: bool = True  # consolidated safetensors beside the DeepSpeed state (for the evaluator)
    checksums: bool = True  # sha256 of every file in the COMPLETE marker (sizes always), verified before resuming
    check_free_space: bool = True  # refuse to start, or skip a save, when the disk cannot hold one more checkpoint
    max_failed_saves: int = 1  # consecutive failed saves tolerated (retried at the next interval); one more stops
    remote: str = ""  # URL (s3://, gs://, ...) each checkpoint is uploaded to in the background ("" = none)
    upload_queue: int = 2  # checkpoints waiting for upload at most; a newer one supersedes the oldest waiting
    upload_retries: int = 4  # a failed upload is retried this many times (backoff 1 s, 2 s, ...), then reported
    upload_timeout_s: float = 60.0  # one request to the bucket (connect, each wait for an answer) fails after this
    upload_drain_s: float = 900.0  # the end of a run waits at most this long for the uploads still in flight


@dataclass
class LoggingConfig:
    wandb: bool = True
    project: str = "metalm"
    entity: str | None = None
    run_name: str | None = None
    tags: list = field(default_factory=list)
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline
    progress: bool = True


@dataclass
class NerConfig:
    train: str | None = None
    dev: str | None = None
    test: str | None = None
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
    probe_text: str | None = None  # text/jsonl file for the fixed rank/entropy batch when no val shards
    cka_tokens: int = 1024  # cka: probe-batch rows (tokens) whose activations are saved and compared per checkpoint
    downstream_tasks: list = field(default_factory=lambda: ["arc_easy", "hellaswag", "piqa", "sciq"])
    downstream_limit: int = 500  # downstream: the first N documents of each task in file order; 0: all
    downstream_batch_tokens: int = 8192  # downstream: padded tokens per forward batch (sets the time, not the scores)
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


# ------------------------------------------------------------------------------------------------ allowed values
# The one definition of each set of allowed values; code that checks or branches on one of these keys imports
# the constant from here.
KERNEL_BACKENDS = ("auto", "triton", "torch")  # model.kernels
ON_BAD_SAMPLE = ("error", "skip")  # data.on_bad_sample
TEXT_SPLITS = ("file", "blank_line")  # data.text_split
LR_SCHEDULES = ("cosine", "linear", "constant", "wsd")  # optim.schedule
PRECISIONS = ("fp32", "bf16", "fp16")  # train.precision
DEVICES = ("auto", "cpu", "cuda")  # train.device
NONFINITE_POLICIES = ("skip", "stop")  # train.nonfinite_policy
ZERO_STAGES = (0, 1, 2, 3)  # train.zero_stage
META_BRANCHES = ("per_step", "per_microbatch")  # meta.branch
META_SAMPLERS = ("smlmt", "reference")  # meta.sampler
HEAD_INITS = ("persistent", "zero", "prototype")  # meta.head_init
META_CLASS_SETS = ("any", "word_start")  # meta.classes
META_READOUTS = ("mask", "after", "prev")  # meta.readout
FEATURE_NORMS = ("none", "center", "standardize", "layernorm")  # meta.feature_norm
META_OBJECTIVES = ("replace", "add")  # meta.objective
HEAD_WEIGHT_INITS = ("xavier", "normal")  # meta.head.init
LOGGING_MODES = ("auto", "online", "offline")  # logging.mode
NER_MODES = ("head", "full")  # eval.ner.mode
NER_LABEL_TOKENS = ("first", "last")  # eval.ner.label_token
EVAL_METRICS = ("val_loss", "rank", "entropy", "ner", "downstream", "stats", "cka")  # eval.metrics: any of these

# Which key takes which set (read by the section checkers below and by scripts/gen_config_docs.py).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.kernels": KERNEL_BACKENDS,
    "data.on_bad_sample": ON_BAD_SAMPLE,
    "data.text_split": TEXT_SPLITS,
    "optim.schedule": LR_SCHEDULES,
    "train.precision": PRECISIONS,
    "train.device": DEVICES,
    "train.nonfinite_policy": NONFINITE_POLICIES,
    "meta.branch": META_BRANCHES,
    "meta.sampler": META_SAMPLERS,
    "meta.head_init": HEAD_INITS,
    "meta.classes": META_CLASS_SETS,
    "meta.readout": META_READOUTS,
    "meta.feature_norm": FEATURE_NORMS,
    "meta.objective": META_OBJECTIVES,
    "meta.head.init": HEAD_WEIGHT_INITS,
    "logging.mode": LOGGING_MODES,
    "eval.ner.mode": NER_MODES,
    "eval.ner.label_token": NER_LABEL_TOKENS,
}

# ------------------------------------------------------------------------------------------------ value bounds
# Every value of a merged config (file, overrides or defaults) must fit these (see _check_values).
MAX_STRING_CHARS = 4096  # any string value (PATH_MAX on Linux)
INT64_MAX = 2**63 - 1  # every integer must fit a torch.int64 / C long long
MAX_LR = 1.0  # optim.lr above this is refused
INT64_MIN = -(2**63)


def _merge(base: DictConfig, data: dict, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{origin}: key {key!r}: {_reason(e)}") from None
    except OverflowError as e:  # an integer beyond any float, for a float key (OmegaConf does not say which)
        key = _too_large_for_float(data, "") or "?"
        raise ConfigError(f"{origin}: key {key!r}: {_reason(e)}") from None


def _too_large_for_float(node: Any, where: str) -> str | None:
    """The first key whose value is an integer that no float can hold."""
    if isinstance(node, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in node.items())
    elif isinstance(node, list):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(node))
    else:
        return where if isinstance(node, int) and abs(node) > sys.float_info.max else None
    for key, value in items:
        found = _too_large_for_float(value, key)
        if found:
            return found
    return None


def _reason(e: Exception) -> str:
    msg = str(e).split("\n")[0]
    if "not in struct" in msg or ("Key '" in msg and "not" in msg):
        return f"unknown key ({msg})"
    if isinstance(e, OverflowError):
        return f"number too large for a float ({msg})"
    return msg


def _set_override(cfg: DictConfig, key: str, value: Any) -> None:
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except (OmegaConfBaseException, OverflowError) as e:
        raise ConfigError(f"override {key}={show(value)}: {_reason(e)}") from None


# ------------------------------------------------------------------------------------------------ validation
# One checker per section, each given that section's node (an OmegaConf DictConfig at run time, so these are
# functions rather than methods of the dataclasses); `validate` runs them, then the checks across sections.


def _bad(key: str, value: Any, expected: str) -> NoReturn:
    raise ConfigError(f"{key}={show(value)}: {expected}")


def _check_choices(section: str, node: Any) -> None:
    for key, allowed in CHOICES.items():
        parent, name = key.rsplit(".", 1)
        if parent == section and getattr(node, name) not in allowed:
            _bad(key, getattr(node, name), f"expected one of {', '.join(map(str, allowed))}")


def _check_positive_ints(section: str, node: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(node, name) <= 0:
            _bad(f"{section}.{name}", getattr(node, name), "expected a positive integer")


def _check_positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        _bad(key, value, "expected a finite number > 0")


def _check_seed(key: str, value: int) -> None:
    if not 0 <= value <= INT64_MAX:  # torch, numpy and random all take it; derived seeds stay in int64
        _bad(key, value, "expected an integer in 0..2**63-1")


def _is_url(location: str) -> bool:
    from metalm.storage import is_url

    return is_url(location)


def _check_location(key: str, location: str, writable: bool = False) -> None:
    """A location key: no inline credentials, not read-only where it is written (metalm.storage). Whether the
    scheme's package is installed is checked where the location is used (the evaluator reads configs of runs
    made elsewhere)."""
    from metalm.storage import StorageError, check_location

    try:
        check_location(location, key, writable=writable)
    except StorageError as e:
        raise ConfigError(str(e)) from None


def run_locations(cfg: Config) -> tuple[Path, str | None]:
    """(the run's local directory, the URL its checkpoints are uploaded to or None). A URL train.run_dir keeps
    the run locally in train.local_dir (default runs/<the URL's last part>) and uploads to RUN_URL/checkpoints;
    otherwise train.run_dir is the local directory and checkpoint.remote (if set) the upload URL."""
    t, c = cfg.train, cfg.checkpoint
    if _is_url(t.run_dir):
        name = t.run_dir.rstrip("/").rsplit("/", 1)[-1] or "run"
        return Path(t.local_dir or os.path.join("runs", name)), t.run_dir.rstrip("/") + "/checkpoints"
    return Path(t.run_dir), (c.remote.rstrip("/") or None)


def _validate_model(m: ModelConfig) -> None:
    _check_choices("model", m)
    _check_positive_ints("model", m, ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size",
                                      "max_seq_len"))
    if m.d_model % m.n_heads:
        _bad("model.d_model", m.d_model, f"must be divisible by model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        _bad("model.d_model", m.d_model, f"head dim d_model/n_heads={m.d_model // m.n_heads} must be even for RoPE")
    if m.n_heads % m.n_kv_heads:
        _bad("model.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads={m.n_heads}")
    _check_positive("model.norm_eps", m.norm_eps)


def _validate_data(d: DataConfig) -> None:
    _check_choices("data", d)
    if not 0.0 <= d.val_fraction < 1.0:
        _bad("data.val_fraction", d.val_fraction, "expected a fraction in [0, 1)")
    _check_positive_ints("data", d, ("samples_per_shard",))
    if d.num_workers < 0:
        _bad("data.num_workers", d.num_workers, "expected >= 0 (0: load in the training process)")
    if d.prepare_num_proc < 0:
        _bad("data.prepare_num_proc", d.prepare_num_proc, "expected >= 0 (0: one per available core)")
    if d.read_ahead < 0:
        _bad("data.read_ahead", d.read_ahead, "expected >= 0 shards (0: download each shard when it is needed)")
    if d.retries < 0:
        _bad("data.retries", d.retries, "expected >= 0 (0: a failed download is an error at once)")
    _check_location("data.shards", d.shards)
    _check_location("data.source", d.source)
    if d.cache_dir and _is_url(d.cache_dir):
        _bad("data.cache_dir", d.cache_dir, "expected a local directory (it caches what is read from a URL)")


def _validate_optim(o: OptimConfig) -> None:
    _check_choices("optim", o)
    _check_positive("optim.lr", o.lr)
    if o.lr > MAX_LR:
        _bad("optim.lr", o.lr, f"expected at most {MAX_LR:g} (AdamW moves every weight by about lr per step: "
                               f"a larger one destroys the model at the first update)")
    betas = list(o.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0
                                  for b in betas):
        _bad("optim.betas", betas, "expected two numbers in [0, 1)")
    if o.warmup_steps < 0:
        _bad("optim.warmup_steps", o.warmup_steps, "expected >= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _bad("optim.min_lr_ratio", o.min_lr_ratio, "expected a ratio in [0, 1]")
    if not 0.0 <= o.decay_fraction <= 1.0:
        _bad("optim.decay_fraction", o.decay_fraction, "expected a fraction in [0, 1] of the steps after warm-up")
    if o.grad_clip < 0:
        _bad("optim.grad_clip", o.grad_clip, "expected >= 0 (0 disables clipping)")


def _validate_train(t: TrainConfig) -> None:
    _check_choices("train", t)
    if not t.run_dir.strip():
        _bad("train.run_dir", t.run_dir, "expected a directory path or URL")
    _check_location("train.run_dir", t.run_dir, writable=True)
    if t.local_dir and _is_url(t.local_dir):
        _bad("train.local_dir", t.local_dir, "expected a local directory (the run's staging directory)")
    _check_seed("train.seed", t.seed)
    _check_positive_ints("train", t, ("max_steps",))
    if t.stop_at < 0:
        _bad("train.stop_at", t.stop_at, "expected 0 (off) or a step number")
    _check_positive_ints("train", t, ("global_batch", "micro_batch"))
    if t.grad_accum < 0:
        _bad("train.grad_accum", t.grad_accum, "expected >= 0 (0: derived from train.global_batch)")
    if t.zero_stage not in ZERO_STAGES:
        _bad("train.zero_stage", t.zero_stage, "expected 0, 1, 2 or 3")
    _check_positive_ints("train", t, ("log_every",))
    if t.val_every < 0:
        _bad("train.val_every", t.val_every, "expected >= 0 (0 disables periodic validation)")
    _check_positive_ints("train", t, ("val_batches", "max_nonfinite_in_row", "max_nonfinite_in_window",
                                      "nonfinite_window"))
    if t.max_nonfinite_in_window > t.nonfinite_window:
        _bad("train.max_nonfinite_in_window", t.max_nonfinite_in_window,
             f"expected at most train.nonfinite_window={t.nonfinite_window} (the steps it counts over)")
    if t.spike_window < 0:
        _bad("train.spike_window", t.spike_window, "expected >= 0 (0 disables loss-spike detection)")
    _check_positive("train.spike_sigma", t.spike_sigma)
    if t.grad_stats_every < 0:
        _bad("train.grad_stats_every", t.grad_stats_every, "expected >= 0 (0: no per-layer gradient norms)")
    _check_positive("train.collective_timeout", t.collective_timeout)


def _validate_meta(me: MetaConfig) -> None:
    _check_choices("meta", me)
    if not 0.0 <= me.hybrid_ratio <= 1.0:
        _bad("meta.hybrid_ratio", me.hybrid_ratio, "expected a probability in [0, 1]")
    _check_positive_ints("meta", me, ("n_way", "k_shot", "q_queries", "inner_steps"))
    if me.n_way < 2:
        _bad("meta.n_way", me.n_way, "expected at least 2 ways")
    _check_positive("meta.inner_lr", me.inner_lr)
    if me.min_token_freq < 1:
        _bad("meta.min_token_freq", me.min_token_freq, "expected >= 1")
    if me.max_token_freq and me.max_token_freq < me.min_token_freq:
        _bad("meta.max_token_freq", me.max_token_freq, f"must be 0 or >= meta.min_token_freq={me.min_token_freq}")
    if me.readout_offset < 1:
        _bad("meta.readout_offset", me.readout_offset, "expected >= 1 token after the mask")
    if me.window < 2:
        _bad("meta.window", me.window, "expected >= 2 tokens")
    if me.readout == "after" and me.window <= me.readout_offset:
        _bad("meta.window", me.window, f"must exceed meta.readout_offset={me.readout_offset} (the window holds the "
                                        f"mask and the tokens after it)")
    if me.feature_grad_clip < 0:
        _bad("meta.feature_grad_clip", me.feature_grad_clip, "expected >= 0 (0: no clipping)")
    _check_positive("meta.loss_weight", me.loss_weight)
    _validate_meta_budget(me)
    if me.diag_every < 0:
        _bad("meta.diag_every", me.diag_every, "expected >= 0 (0: no gradient diagnostics)")
    if me.sampler == "reference" and (me.readout != "mask" or me.classes != "any"):
        _bad("meta.sampler", me.sampler, "the paper code's construction reads at the mask position over any token: "
                                         "use meta.readout=mask and meta.classes=any with it, or meta.sampler=smlmt")


def _validate_meta_budget(me: MetaConfig) -> None:
    """The meta-gradient budget and its schedule: one knob sets the meta strength, so the keys it makes inert are
    refused rather than ignored."""
    if me.grad_ratio < 0:
        _bad("meta.grad_ratio", me.grad_ratio, "expected >= 0 (0: no budget, meta.loss_weight weights the loss)")
    budget = me.grad_ratio > 0
    if (budget or me.project) and me.objective != "add":
        key = "meta.grad_ratio" if budget else "meta.project"
        _bad(key, me.grad_ratio if budget else me.project,
             "needs meta.objective=add (the budget and the projection are relative to the meta micro-batch's own AR "
             "gradient); set meta.grad_ratio=0 and meta.project=false for objective=replace")
    if budget and me.loss_weight != 1.0:
        _bad("meta.loss_weight", me.loss_weight, f"expected 1.0 with meta.grad_ratio={me.grad_ratio}, where it is "
                                                 f"inert (the budget sets the meta gradient's norm; Adam ignores the "
                                                 f"scale of the head's gradient); or meta.grad_ratio=0 to weight the "
                                                 f"loss")
    if budget and me.feature_grad_clip > 0:
        _bad("meta.feature_grad_clip", me.feature_grad_clip, f"expected 0 with meta.grad_ratio={me.grad_ratio}, where "
                                                             f"it is inert (the budget rescales the clipped gradient "
                                                             f"back); or meta.grad_ratio=0 for an absolute clip")
    for key in ("grad_ratio_start", "grad_ratio_warmup"):
        if getattr(me, key) < 0:
            _bad(f"meta.{key}", getattr(me, key), "expected >= 0 optimizer steps")
    if not 0.0 <= me.grad_ratio_final <= 1.0:
        _bad("meta.grad_ratio_final", me.grad_ratio_final, "expected a fraction of meta.grad_ratio in [0, 1]")
    scheduled = me.grad_ratio_start or me.grad_ratio_warmup or me.grad_ratio_final != 1.0
    if scheduled and not budget:
        _bad("meta.grad_ratio", me.grad_ratio, "must be > 0 for meta.grad_ratio_start/warmup/final to schedule it")


def _validate_meta_head(h: MetaHeadConfig) -> None:
    _check_choices("meta.head", h)
    if h.layers < 1 or h.hidden <= 0:
        _bad("meta.head.layers", h.layers, "expected >= 1 layer with meta.head.hidden > 0")
    if not 0.0 <= h.dropout < 1.0:
        _bad("meta.head.dropout", h.dropout, "expected a probability in [0, 1)")


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _check_positive_ints("checkpoint", c, ("every",))
    if c.keep_last_k < 1:
        _bad("checkpoint.keep_last_k", c.keep_last_k, "expected >= 1")
    if c.max_failed_saves < 0:
        _bad("checkpoint.max_failed_saves", c.max_failed_saves, "expected >= 0 (0: stop at the first failed save)")
    if c.remote:
        _check_location("checkpoint.remote", c.remote, writable=True)
    _check_positive_ints("checkpoint", c, ("upload_queue",))
    if c.upload_retries < 0:
        _bad("checkpoint.upload_retries", c.upload_retries, "expected >= 0 (0: a failed upload is reported at once)")
    _check_positive("checkpoint.upload_timeout_s", c.upload_timeout_s)
    _check_positive("checkpoint.upload_drain_s", c.upload_drain_s)


def _validate_logging(lg: LoggingConfig) -> None:
    _check_choices("logging", lg)


def _validate_eval(ev: EvalConfig) -> None:
    _check_positive_ints("eval", ev, ("batch_size", "seq_len", "val_batches", "cka_tokens"))
    for name in ev.metrics:
        if name not in EVAL_METRICS:
            _bad("eval.metrics", list(ev.metrics),
                 f"unknown metric {name!r}; expected some of {', '.join(EVAL_METRICS)}")
    tasks = ev.downstream_tasks
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        _bad("eval.downstream_tasks", tasks, "expected a non-empty list of task names (e.g. [arc_easy,hellaswag])")
    dupes = sorted({t for t in tasks if list(tasks).count(t) > 1})
    if dupes:
        _bad("eval.downstream_tasks", list(tasks),
             f"task {dupes[0]!r} listed twice; expected each task once (a repeat would count twice in downstream/bpb)")
    if ev.downstream_limit < 0:
        _bad("eval.downstream_limit", ev.downstream_limit, "expected >= 0 documents per task (0: all)")
    if ev.downstream_batch_tokens <= 0:
        _bad("eval.downstream_batch_tokens", ev.downstream_batch_tokens,
             "expected > 0 padded tokens per downstream batch (a longer request still gets a batch of its own)")


def _validate_ner(ner: NerConfig) -> None:
    _check_choices("eval.ner", ner)
    _check_positive_ints("eval.ner", ner, ("epochs", "batch_size", "max_len", "log_every", "patience"))
    _check_positive("eval.ner.lr", ner.lr)
    _check_seed("eval.ner.seed", ner.seed)
    for i, entry in enumerate(ner.langs):
        if not hasattr(entry, "keys") or not all(entry.get(k) for k in ("lang", "train", "test")):
            _bad(f"eval.ner.langs[{i}]", entry, "expected a mapping with lang, train, test (and optionally dev)")


SECTION_CHECKS: dict[str, Callable[[Any], None]] = {
    "model": _validate_model,
    "data": _validate_data,
    "optim": _validate_optim,
    "train": _validate_train,
    "meta": _validate_meta,
    "meta.head": _validate_meta_head,
    "checkpoint": _validate_checkpoint,
    "logging": _validate_logging,
    "eval": _validate_eval,
    "eval.ner": _validate_ner,
}


def _validate_across(cfg: Config, world_size: int | None) -> None:
    m, t = cfg.model, cfg.train
    if _is_url(t.run_dir) and cfg.checkpoint.remote:
        _bad("checkpoint.remote", cfg.checkpoint.remote, f"train.run_dir={t.run_dir} is a URL already (its "
                                                         f"checkpoints go to {t.run_dir.rstrip('/')}/checkpoints); set "
                                                         f"one of the two")
    me = cfg.meta
    if me.enabled and (me.grad_ratio > 0 or me.project) and t.zero_stage == 3:
        _bad("meta.grad_ratio" if me.grad_ratio > 0 else "meta.project", me.grad_ratio if me.grad_ratio > 0
             else me.project, "needs full parameters on every rank (ZeRO 0-2); under train.zero_stage=3 set "
                              "meta.grad_ratio=0, meta.project=false and weight the loss with meta.loss_weight")
    if t.seq_len <= 0 or t.seq_len > m.max_seq_len:
        _bad("train.seq_len", t.seq_len, f"expected 1..model.max_seq_len={m.max_seq_len}")
    if world_size is not None:
        accum = grad_accum(t, world_size)
        if t.micro_batch * accum * world_size != t.global_batch:
            _bad("train.global_batch", t.global_batch,
                 f"must equal train.micro_batch ({t.micro_batch}) x train.grad_accum ({accum}) x world size "
                 f"({world_size}) = {t.micro_batch * accum * world_size}")


def _check_values(node: Any, where: str) -> None:
    """Every value, typed or not (list items too): floats finite, integers within 64 bits, strings bounded and
    free of NUL characters."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_values(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_values(v, f"{where}[{i}]")
    elif isinstance(node, bool):
        return
    elif isinstance(node, int):
        if not INT64_MIN <= node <= INT64_MAX:
            _bad(where, node, "expected an integer that fits in 64 bits (-2**63..2**63-1)")
    elif isinstance(node, float):
        if not math.isfinite(node):
            _bad(where, node, "expected a finite number")
    elif isinstance(node, str):
        if len(node) > MAX_STRING_CHARS:
            raise ConfigError(f"{where}: a string of {len(node)} characters; expected at most {MAX_STRING_CHARS}")
        if "\x00" in node:  # no path, name or URL holds one (open() would fail on it much later)
            _bad(where, node, "expected text without NUL characters")


def _section(cfg: Config, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check values that the types alone cannot; raise ConfigError naming key and value.

    Each section's own checker, then the checks across sections (with `world_size`: the batch geometry), then
    every value against the bounds (finite floats, 64-bit integers, bounded strings).
    """
    for path, check in SECTION_CHECKS.items():
        check(_section(cfg, path))
    _validate_across(cfg, world_size)
    plain = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dataclasses.asdict(cfg)
    _check_values(plain, "")


def grad_accum(t: TrainConfig, world_size: int) -> int:
    """Gradient accumulation steps of the train section: explicit, or derived from the global batch."""
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
        cfg = _merge(cfg, read_yaml_file(Path(path)), f"config file {path}")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_override(cfg, key, value)
    config: Config = cfg  # type: ignore[assignment]
    validate(config, world_size)
    return config


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(cfg)
