"""What may change between a checkpoint and the run that resumes it.

A resumed run is meant to continue the checkpointed one exactly. Three kinds of difference:

* refused: keys that change the shapes of the parameters (SHAPE_KEYS, and meta.feature_norm to or from
  `layernorm`, which adds or removes the head's LayerNorm) or the kind of optimizer state DeepSpeed saved
  (train.precision; train.zero_stage to or from 0, which has no ZeRO partitions). DeepSpeed could not load the
  checkpoint; the message names each key with both values and the ways out. A change between ZeRO stages 1, 2
  and 3, like a change of the number of processes, loads: 1 and 2 share one partition layout, the others go
  through DeepSpeed's universal checkpoint format (metalm.train.checkpointer converts on resume).
* warned: keys that change what is trained from here on but load (the rest of model.*, optim.*, meta.*, and
  TRAINING_KEYS such as train.max_steps, which moves the learning-rate schedule): made on purpose, said once.
* silent: everything else (where the run writes, logging, checkpointing, evaluation, data loading workers),
  and implementation choices that compute the same model (QUIET_KEYS).

And the data: the loader's position is a position in one list of shards. The checkpoint records the
fingerprint of the train split it read (`data_hash`: sha256 of its shard list with the sizes and sha256 of
each shard); other shards, even with the same sample count, are refused unless checkpoint.allow_data_change.
"""
from __future__ import annotations

from typing import Any

SHAPE_KEYS = ("model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.ffn_hidden",
              "model.vocab_size", "model.tie_embeddings", "meta.enabled", "meta.head.layers", "meta.head.hidden")
WARN_SECTIONS = ("model.", "optim.", "meta.")
ZERO_STAGES_SHARING_A_LAYOUT = (1, 2)  # at one world size, a checkpoint of either loads into the other as it is
TRAINING_KEYS = ("train.max_steps", "train.zero_stage", "train.nonfinite_policy")
QUIET_KEYS = ("model.kernels", "model.fused_linear_ce", "model.activation_checkpointing", "meta.diag_every")
WAY_OUT = "resume with the checkpoint's values, or start afresh in a new train.run_dir (or checkpoint.resume=never)"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"model.d_model": 48, ...} from a nested config dict."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def _refused(key: str, saved: Any, now: Any) -> bool:
    if key == "meta.feature_norm":
        return (saved == "layernorm") != (now == "layernorm")
    if key == "train.zero_stage":
        return (saved == 0) != (now == 0)
    return key in SHAPE_KEYS or key == "train.precision"


def _warned(key: str) -> bool:
    return key not in QUIET_KEYS and (key.startswith(WARN_SECTIONS) or key in TRAINING_KEYS)


def config_changes(saved: dict, now: dict) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(refused, warned) differences between the checkpoint's config and this run's, both nested dicts, as
    (key, checkpoint's value, this run's value), in key order. A key only one side has (a config from another
    metalm version) is not compared."""
    a, b = flatten(saved), flatten(now)
    refused, warned = [], []
    for key in sorted(a.keys() & b.keys()):
        old, new = a[key], b[key]
        if old == new:
            continue
        if _refused(key, old, new):
            refused.append((key, old, new))
        elif _warned(key):
            warned.append((key, old, new))
    return refused, warned


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key}={old!r} in the checkpoint, {new!r} now" for key, old, new in changes)


def refusal(where: str, refused: list[tuple[str, Any, Any]]) -> str:
    return (f"cannot resume from {where}: {describe_changes(refused)}: DeepSpeed cannot load its parameters or "
            f"optimizer state into this run's; {WAY_OUT}")


def change_warning(where: str, warned: list[tuple[str, Any, Any]]) -> str:
    return (f"resuming from {where} with a changed config: {describe_changes(warned)}; these load, and training "
            f"continues with this run's values")


def data_difference(saved_hash: str, now_hash: str, saved_shards: str | None, now_shards: str) -> str:
    return (f"data.shards={now_shards} is not the data the checkpoint was trained on (it read "
            f"{saved_shards or 'shards'} whose train split's fingerprint is {saved_hash[:16]}..., these give "
            f"{now_hash[:16]}...: other shards, sizes or contents)")


def data_refusal(where: str, difference: str) -> str:
    return (f"cannot resume from {where}: {difference}; an exact resume needs the same shards: point data.shards "
            f"at them, or set checkpoint.allow_data_change=true to continue on these at the same position")


def data_warning(where: str, difference: str) -> str:
    return (f"resuming from {where}: {difference}; continuing on them at the same position "
            f"(checkpoint.allow_data_change=true)")
