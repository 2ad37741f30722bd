"""Evaluate one checkpoint: every metric its config's `eval.metrics` asks for (validation loss, effective rank,
attention entropy, NER, downstream benchmarks, matrix statistics, CKA to the previous checkpoint), returned as a
result record that the watcher writes (metalm/eval/watcher.py).

Every file read is first checked against the checkpoint's COMPLETE marker (sizes, and sha256 where the marker
records them): a corrupted file is a CheckpointError naming it, never a metric computed from it. A metric that
cannot run for want of data is skipped with a WARNING saying why and how to supply what it needs; a local input
file the config names (NER data, probe text, a downstream task) that is not there is an InputError before the
model is loaded; a metric that raises is listed under "failed" and the metrics computed before and after it are
kept.

The validation shards are the config's `data.shards`, unless `shards` (the evaluator's --shards) names others;
when `data.shards` is a relative path that does not exist from the current directory (the trainer ran
elsewhere), the absolute path the run recorded in its trainer state (`data_shards`) is used if it exists.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from collections.abc import Callable

from metalm.checkpoint import CONFIG_FILE, STATE_FILE, TOKENIZER_FILE
from metalm.storage import is_url

log = logging.getLogger("metalm.eval.checkpoint_eval")

RESULT_VERSION = 1
# the small files checked (sha256 included) before they are read; config.yaml and model.safetensors are
# checked by load_model itself
SMALL_FILES = (STATE_FILE, CONFIG_FILE, TOKENIZER_FILE)


class OverrideError(ValueError):
    """The evaluator's --config overrides do not apply to this checkpoint's config (which alone is valid): a
    fault of the overrides, not of the checkpoint."""


class InputError(OverrideError):
    """A file the evaluation config names (NER data, probe text) is not there: a fault of the inputs, not of the
    checkpoint, found before the model is loaded."""


def input_problems(cfg) -> list[str]:
    """One message per local file named by `cfg.eval` (eval.ner.train/dev/test, the eval.ner.langs entries,
    eval.probe_text) that is not a file, and one naming the eval.downstream_tasks without a request file when
    downstream is asked for; URLs are left to the reader."""
    nc = cfg.eval.ner
    named = [(f"eval.ner.{k}", getattr(nc, k)) for k in ("train", "dev", "test")]
    for i, entry in enumerate(nc.langs or []):
        named += [(f"eval.ner.langs[{i}].{k}", entry.get(k)) for k in ("train", "dev", "test")]
    named.append(("eval.probe_text", cfg.eval.probe_text))
    problems = []
    for key, value in named:
        if value and "://" not in str(value) and not Path(str(value)).is_file():
            what = "a text/jsonl file" if key == "eval.probe_text" else "an IOB2 file in Universal NER's format"
            problems.append(f"{key}={value}: no such file (expected {what}; relative paths are from {os.getcwd()})")
    if "downstream" in cfg.eval.metrics:
        from metalm.eval.downstream import PackageMissing, unknown_tasks

        try:
            unknown = unknown_tasks(list(cfg.eval.downstream_tasks))
        except PackageMissing:
            unknown = None  # no request files at all: the metric is skipped with the fix when it runs
        if unknown:
            problems.append(unknown)
    return problems


def pick_device(spec: str) -> str:
    """The evaluator's --device as a torch device string, or DeviceError saying why it cannot be used here."""
    from metalm.device import resolve_device

    return resolve_device(spec, "--device")


def resolve_shards(cfg, state, shards: str | None = None, from_overrides: bool = False) -> tuple[str, str]:
    """(the validation shards to read, where that choice came from: "--shards", "config" or
    "trainer_state.json"). A relative `data.shards` that does not exist from the current directory gives way
    to the absolute path the run recorded (`state.data_shards`) when that exists; one set by an override is
    taken as given."""
    if shards:
        return str(shards), "--shards"
    configured = str(cfg.data.shards)
    if from_overrides or is_url(configured) or Path(configured).is_absolute() or Path(configured).exists():
        return configured, "config"
    recorded = getattr(state, "data_shards", None)
    if recorded and (is_url(recorded) or Path(recorded).exists()):
        return recorded, STATE_FILE
    return configured, "config"


PROBE_FIX = ("set eval.probe_text to a text/jsonl file (--config eval.probe_text=FILE), or give validation shards "
             "(--shards DIR)")
VAL_FIX = ("pass --shards DIR (the run's shards directory, with manifest.json) or --config data.shards=DIR; or leave "
           "val_loss out of eval.metrics")
NER_DATA_FIX = ("set eval.ner.train and eval.ner.test (IOB2 files) or eval.ner.langs with --config, or leave ner out "
                "of eval.metrics")
CKA_FIX = "evaluate through the watcher (launchers/evaluate.py), which passes its results directory"
CKA_FIRST_FIX = ("CKA needs an earlier checkpoint evaluated with cka on the same probe batch in the same results "
                 "directory; later checkpoints are compared with this one")
NER_TOKENIZER_FIX = "the checkpoint has no usable tokenizer.json: set data.tokenizer with --config"


def _probe_batch(cfg, model, ckpt_dir: Path, encode_text: Callable[[], Callable]) -> tuple:
    """The fixed (B, T+1) batch for rank/entropy: first validation batch, else eval.probe_text."""
    from metalm.eval.valloss import as_tokens, probe_batch_from_text, val_batches_from_config

    B = cfg.eval.batch_size
    T = min(cfg.eval.seq_len, model.cfg.max_seq_len)
    it, reason = val_batches_from_config(cfg, B)
    if it is not None:
        try:
            b = as_tokens(next(it))
            return b[:B, : T + 1], "val"
        except StopIteration:
            reason = "the validation split is empty"
    if cfg.eval.probe_text:
        return probe_batch_from_text(cfg.eval.probe_text, encode_text(), B, T, cfg.data.text_field), "probe_text"
    return None, f"no probe batch: {reason} and eval.probe_text is not set"


def _overrides_set(overrides: list[str], key: str) -> bool:
    return any(item.split("=", 1)[0].strip() == key for item in overrides)


def evaluate_checkpoint(ckpt_dir: Path, overrides: list[str] | None = None, device: str = "cpu",
                        progress: Callable[[str], None] = lambda s: None, *, name: str | None = None,
                        origin: str | None = None, shards: str | None = None, verify: bool = True,
                        results: Path | None = None) -> dict:
    """Every metric in the checkpoint's `eval.metrics` (after overrides), plus `ner` whenever eval.ner.train and
    eval.ner.test (or eval.ner.langs) are set. A metric that cannot run (no validation shards, no probe batch, no
    NER data) is listed under "skipped" with the reason and the fix, and logged as a WARNING. Returns the result
    record.

    `name` is the checkpoint's name in the record and in log lines (default: the directory's name); `origin` the
    location named in messages instead of `ckpt_dir` (the watcher evaluates a snapshot of the checkpoint);
    `shards` replaces the validation shards of the config (see the module doc); `verify` checks the sha256 of
    every file against the marker before it is read; `results` is the results directory, where `cka` keeps each
    checkpoint's activations (metalm/eval/cka.py; without it `cka` is skipped)."""
    import torch

    from metalm.checkpoint import CheckpointError, checkpoint_problem, load_model, read_state
    from metalm.config import ConfigError, load_config
    from metalm.data.errors import DataError

    t_start = time.time()
    ckpt_dir = Path(ckpt_dir)
    overrides = list(overrides or [])
    label = name or ckpt_dir.name
    where = origin or str(ckpt_dir)

    def here(text: str) -> str:
        return text.replace(str(ckpt_dir), where) if origin else text

    problem = checkpoint_problem(ckpt_dir, checksums=verify, only=SMALL_FILES)
    if problem is not None:
        raise CheckpointError(f"{where} is not a usable checkpoint: {problem}")
    state = read_state(ckpt_dir)
    try:
        cfg = load_config(ckpt_dir / CONFIG_FILE, overrides)
    except ConfigError as e:
        try:
            load_config(ckpt_dir / CONFIG_FILE)
        except ConfigError:
            raise CheckpointError(here(f"{ckpt_dir}/{CONFIG_FILE}: {e}")) from None
        raise OverrideError(f"the --config overrides do not apply to {where}: {e}") from None
    problems = input_problems(cfg)
    if problems:
        raise InputError("; ".join(problems))
    shard_path, shard_from = resolve_shards(cfg, state, shards, _overrides_set(overrides, "data.shards"))
    if shard_path != cfg.data.shards:
        if shard_from == STATE_FILE:
            log.info("%s: data.shards=%r does not exist from %s; using the run's shards %s (data_shards in "
                     "trainer_state.json)", label, cfg.data.shards, os.getcwd(), shard_path)
        cfg.data.shards = shard_path
    model, _ = load_model(ckpt_dir, device, verify=verify)
    model.eval()
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    details: dict = {"shards": {"path": str(cfg.data.shards), "from": shard_from}}
    timing: dict[str, float] = {}
    failed: dict[str, str] = {}
    tok_cache: list = []

    def skip(metrics_: tuple[str, ...], reason: str, fix: str) -> None:
        reason = here(reason)
        for m in metrics_:
            skipped[m] = f"{reason}; {fix}"
        log.warning("%s: %s skipped: %s; %s", label, " and ".join(metrics_), reason, fix)

    def tokenizer():
        if not tok_cache:
            from metalm.eval.ner import load_tokenizer_for

            tok_cache.append(load_tokenizer_for(ckpt_dir, cfg))
        return tok_cache[0]

    def text_encoder():
        from metalm.eval.ner import word_encoder

        enc = word_encoder(tokenizer())
        return lambda text: enc(text, 0)

    wanted = list(cfg.eval.metrics)
    nc = cfg.eval.ner
    if "ner" not in wanted and ((nc.train and nc.test) or nc.langs):
        wanted.append("ner")  # NER data configured: evaluate it (set eval.ner.train=null to turn it off)
    probe = None
    if {"rank", "entropy", "stats", "cka"} & set(wanted):
        try:
            probe, src = _probe_batch(cfg, model, ckpt_dir, text_encoder)
        except (DataError, OSError) as e:  # unreadable shards, probe text or tokenizer; a bug propagates
            probe, src = None, f"no probe batch: {type(e).__name__}: {e}"
        if probe is not None:
            probe = probe.to(device)
            details["probe"] = {"source": src, "shape": list(probe.shape)}
        else:
            details["probe"] = {"source": None, "reason": here(src)}

    def compute(metric: str, model) -> None:
        if metric == "val_loss":
            from metalm.eval.valloss import val_batches_from_config, validation_loss

            it, reason = val_batches_from_config(cfg, cfg.eval.batch_size)
            if it is None:
                skip(("val_loss",), reason, VAL_FIX)
                return
            r = validation_loss(model, it, cfg.eval.val_batches, device)
            metrics.update({k: float(v) for k, v in r.items()})
            progress(f"val_loss {r['val_loss']:.4f}")
        elif metric == "rank":
            from metalm.eval import rank

            r = rank.weight_ranks(model)
            details["rank_weight"] = r
            metrics.update(rank.flatten("rank/weight", r))
            if probe is None:
                skip(("rank_activations", "rank_gradients"), details["probe"]["reason"], PROBE_FIX)
            else:
                ra = rank.activation_ranks(model, probe[:, :-1])
                rg = rank.gradient_ranks(model, probe)
                details["rank_activations"], details["rank_gradients"] = ra, rg
                metrics.update(rank.flatten("rank/act", ra))
                metrics.update(rank.flatten("rank/grad", rg))
            progress(f"rank: attention ER {r['attn_mean_er']:.2f} (PER {r['attn_mean_per']:.3f})")
        elif metric == "entropy":
            from metalm.eval import entropy

            if probe is None:
                skip(("entropy",), details["probe"]["reason"], PROBE_FIX)
                return
            r = entropy.attention_entropy(model, probe[:, :-1])
            details["entropy"] = r
            metrics.update(entropy.flatten("entropy", r))
            progress(f"entropy: normalised {r['norm_mean']:.3f}")
        elif metric == "stats":
            from metalm.eval import matrix_stats

            r = matrix_stats.weight_stats(model)
            details["stats_weight"] = r
            metrics.update(matrix_stats.flatten("stats/weight", r))
            if probe is None:
                skip(("stats_activations",), details["probe"]["reason"], PROBE_FIX)
            else:
                ra = matrix_stats.activation_stats(model, probe[:, :-1])
                details["stats_activations"] = ra
                metrics.update(matrix_stats.flatten("stats/act", ra))
            progress(f"stats: weight condition number {r['mean']['cond']:.3g}, Hoyer {r['mean']['hoyer']:.3f}")
        elif metric == "cka":
            from metalm.eval import cka

            if results is None:
                skip(("cka",), "no results directory to keep activations in", CKA_FIX)
                return
            if probe is None:
                skip(("cka",), details["probe"]["reason"], PROBE_FIX)
                return
            inputs = probe[:, :-1]
            acts = cka.layer_activations(model, inputs, cfg.eval.cka_tokens)
            r, reason = cka.cka_to_previous(Path(results), state.step, acts, cka.probe_digest(inputs))
            if r is None:
                skip(("cka",), reason, CKA_FIRST_FIX)
                return
            details["cka"] = r
            metrics.update(cka.flatten("cka", r))
            progress(f"cka: mean {r['mean']:.4f} against step {r['prev_step']}")
        elif metric == "ner":
            from metalm.eval import ner

            if not ((nc.train and nc.test) or nc.langs):
                skip(("ner",), "eval.ner.train/test (or eval.ner.langs) not set", NER_DATA_FIX)
                return
            try:
                enc = ner.word_encoder(tokenizer(), nc.word_sep)
            except (DataError, OSError) as e:  # no readable tokenizer; a bug propagates
                skip(("ner",), f"no tokenizer: {e}", NER_TOKENIZER_FIX)
                return
            r = ner.run_ner(model, enc, nc, device, progress)
            details["ner"] = r
            metrics.update(ner.flatten("ner", r))
            if "test" in r:
                progress(f"ner: test F1 {r['test']['f1']:.4f}")

        elif metric == "downstream":
            from metalm.eval import downstream

            try:
                downstream.tasks_root()
                enc = downstream.text_encoder(tokenizer())
            except downstream.PackageMissing as e:
                skip(("downstream",), str(e), downstream.INSTALL_FIX)
                return
            except (DataError, OSError) as e:  # no readable tokenizer; a bug propagates
                skip(("downstream",), f"no tokenizer: {e}", NER_TOKENIZER_FIX)
                return
            tasks = list(cfg.eval.downstream_tasks)
            r = downstream.run_downstream(model, enc, tasks, cfg.eval.downstream_limit,
                                          cfg.eval.downstream_batch_tokens, device, progress)
            details["downstream"] = r
            metrics.update(downstream.flatten("downstream", r))
            progress(f"downstream: mean bpb {r['bpb']:.4f} over {', '.join(tasks)}")

    for metric in wanted:
        t0 = time.time()
        try:
            compute(metric, model)
        except Exception as e:  # noqa: BLE001 - keep the metrics already computed; the watcher records the failure
            failed[metric] = here(f"{type(e).__name__}: {e}")
            log.error("%s: %s failed: %s", label, metric, failed[metric])
        timing[metric] = round(time.time() - t0, 3)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "version": RESULT_VERSION, "checkpoint": label, "step": state.step,
        "tokens": state.tokens, "metrics": metrics, "skipped": skipped, "failed": failed, "timing": timing,
        "seconds": round(time.time() - t_start, 3), "device": device, "details": details,
        "run": {"wandb": bool(cfg.logging.wandb), "project": cfg.logging.project, "entity": cfg.logging.entity,
                "name": cfg.logging.run_name, "mode": cfg.logging.mode},
    }
