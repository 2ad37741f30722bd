"""The on-disk checkpoint format, below both `train/` (which writes it) and `eval/` / `export/` (which read it).

    layout.py      file and directory names, the COMPLETE marker, `latest`, the trainer-state schema; the local
                   writer's side (finalize, prune, sweep what interrupted saves left)
    store.py       the checkpoints under a local path or URL: list, latest, verify, fetch, upload, prune; and
                   `locate`, what a user names (run dir, checkpoints/, latest, step dir) -> one checkpoint
    rank_state.py  the per-rank state file (data-loader position, RNG), read without unpickling code
    weights.py     consolidated safetensors weights: write, and load a verified checkpoint's model
    compat.py      what may change between a checkpoint and the run that resumes it (config keys, data)

Layout of one checkpoint, `RUN/checkpoints/step_00000100/`:
    ds/                    DeepSpeed state: model, optimizer (ZeRO partitions), LR scheduler
    rank_00000.pt          per-rank state: data-loader position, RNG states (read with weights_only=True)
    trainer_state.json     TrainerState: step, tokens, world size, batch geometry, tokenizer, guard state
    config.yaml            the resolved config of the run
    model.safetensors      consolidated weights of the Transformer (HF Llama names), for evaluation/export
    meta_head.safetensors  the meta-learning head (when meta is enabled)
    tokenizer.json         the tokenizer the run trained with (when known)
    COMPLETE               completion marker, written last: JSON with the size (and, with checkpoint.checksums,
                           the sha256) of every other file

Everything is written under `.tmp-step_00000100/`, fsynced, recorded in the marker and renamed into place;
`latest` (a text file naming the directory) is replaced atomically after that. A crash at any point leaves
either the previous checkpoint or the new complete one as `latest`, never a half-written one. A checkpoint
whose files no longer match its marker (truncated, bit-rotted) is not complete: readers skip or refuse it,
naming it and the file.
"""
from metalm.checkpoint.layout import (CONFIG_FILE, DS_DIR, DS_POINTER, HEAD_FILE, MARKER, MODEL_FILE, POINTER,
                                      STATE_FILE, STEP_RE, TOKENIZER_FILE, CheckpointError, TrainerState,
                                      checkpoint_files, checkpoint_problem, clean_stale, find_latest, finalize,
                                      is_complete, list_checkpoints, prune, read_marker, read_state, record_files,
                                      resume_mismatch, step_dir_name, write_state)
from metalm.checkpoint.rank_state import load_rank_state, save_rank_state, set_rng_state
from metalm.checkpoint.store import CheckpointStore, locate
from metalm.checkpoint.weights import load_model, save_weights

__all__ = [
    "CONFIG_FILE",
    "DS_DIR",
    "DS_POINTER",
    "HEAD_FILE",
    "MARKER",
    "MODEL_FILE",
    "POINTER",
    "STATE_FILE",
    "STEP_RE",
    "TOKENIZER_FILE",
    "CheckpointError",
    "CheckpointStore",
    "TrainerState",
    "checkpoint_files",
    "checkpoint_problem",
    "clean_stale",
    "finalize",
    "find_latest",
    "is_complete",
    "list_checkpoints",
    "load_model",
    "load_rank_state",
    "locate",
    "prune",
    "read_marker",
    "read_state",
    "record_files",
    "resume_mismatch",
    "save_rank_state",
    "save_weights",
    "set_rng_state",
    "step_dir_name",
    "write_state",
]
