"""What a training run would use, without starting one: `metalm-train --print-config` and `--dry-run`.

Neither starts a process group, touches the run directory or prepares data. --print-config needs only the
config; --dry-run also builds the model on PyTorch's meta device (shapes without storage, so a 570M model
costs no memory), estimates one step's memory with the preflight formula the trainer applies, and reads the
shards' manifest when there is one.
"""
from __future__ import annotations

import json

from metalm.config import Config, grad_accum, to_yaml


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _say(text: str) -> None:
    print(f"# {text}", flush=True)


def print_config(cfg: Config, world: int, source: str, origin: str) -> None:
    """The resolved YAML, the world geometry (`origin`: where the world size came from) and the DeepSpeed JSON,
    on stdout."""
    t = cfg.train
    accum = grad_accum(t, world)
    _say(f"resolved config: {source}")
    print(to_yaml(cfg), end="", flush=True)
    _say(f"world: {world} process{'es' if world != 1 else ''} ({origin})")
    _say(f"batch: micro_batch {t.micro_batch} x grad_accum {accum} x world {world} = global_batch "
         f"{t.micro_batch * accum * world} sequences of {t.seq_len} tokens "
         f"({t.micro_batch * accum * world * t.seq_len:,} tokens per optimizer step)")
    from metalm.train.engine import deepspeed_config

    _say("DeepSpeed config (derived from the above by metalm.train.engine.deepspeed_config):")
    print(json.dumps(deepspeed_config(cfg.optim, cfg.train, world), indent=2), flush=True)


def dry_run(cfg: Config, world: int) -> None:
    """The model's parameter counts, one step's estimated memory per rank against what this machine has, and
    the data the run would read; every line starts with '# '."""
    import torch

    from metalm.device import DeviceError, resolve_device
    from metalm.train.errors import TrainingError
    from metalm.train.module import PretrainModule
    from metalm.train.preflight import check_step_memory, step_memory_bytes

    m, t = cfg.model, cfg.train
    with torch.device("meta"):  # shapes only: nothing is allocated, nothing initialised for real
        module = PretrainModule.from_config(cfg)
    lm = sum(p.numel() for p in module.lm.parameters())
    head = sum(p.numel() for p in module.head.parameters()) if module.head is not None else 0
    tied = "tied" if m.tie_embeddings else "untied"
    meta = f"meta head {head / 1e6:.2f}M ({head:,}; {cfg.meta.head.layers} layers)" if head else "meta off: no head"
    _say(f"model: {lm / 1e6:.2f}M parameters ({lm:,}; {tied} embeddings, vocabulary {m.vocab_size:,}) + {meta}")

    parts = step_memory_bytes(lm + head, d_model=m.d_model, n_layers=m.n_layers, ffn_hidden=m.ffn_hidden,
                              vocab_size=m.vocab_size, micro_batch=t.micro_batch, seq_len=t.seq_len,
                              precision=t.precision, zero_stage=t.zero_stage, world_size=world,
                              fused_linear_ce=m.fused_linear_ce)
    detail = ", ".join(f"{k} {_size(v)}" for k, v in parts.items())
    _say(f"memory per rank, one step (estimate, {t.precision}, ZeRO-{t.zero_stage}, world {world}): "
         f"{_size(sum(parts.values()))} ({detail})")
    try:
        device = resolve_device(t.device, "train.device")
    except DeviceError as e:
        _say(f"device: the run would stop here: {e}")
    else:
        try:
            warnings = check_step_memory(parts, device, grad_accum(cfg.train, world))
            _say(f"memory check on this machine ({device}): fits" + ("" if t.check_memory else
                 " (train.check_memory=false: the run does not check)"))
        except TrainingError as e:
            verdict = "the run would stop" if t.check_memory else "train.check_memory=false: the run would try"
            _say(f"memory check on this machine ({device}): {verdict}: {e}")
            warnings = []
        for w in warnings:
            _say(f"warning: {w}")

    _describe_data(cfg, world)
    _say("dry run: nothing trained, no process group started, nothing written")


def _describe_data(cfg: Config, world: int) -> None:
    from metalm.data.errors import DataError
    from metalm.data.manifest import MANIFEST, load_manifest, validation_problem

    from metalm.storage import StorageError, join, open_store

    d, t = cfg.data, cfg.train
    try:
        store = open_store(d.shards)
        found = store.exists(MANIFEST)
    except (StorageError, DataError) as e:
        _say(f"data: data.shards={d.shards}: {e}")
        return
    if not found:
        if d.prepare_if_missing:
            _say(f"data: no {MANIFEST} in data.shards={d.shards}: the run would first prepare it from "
                 f"data.source={d.source} with data.tokenizer={d.tokenizer} (data.prepare_if_missing=true)")
        else:
            _say(f"data: no {MANIFEST} in data.shards={d.shards}, and data.prepare_if_missing=false: the run "
                 f"would stop; run metalm-prepare --out {d.shards} first")
        return
    try:
        man = load_manifest(store)
    except DataError as e:
        _say(f"data: {e}")
        return
    tr, va = man["splits"]["train"], man["splits"]["val"]
    tokens = man.get("totals", {}).get("tokens", 0)
    _say(f"data: {join(d.shards, MANIFEST)}: train {tr['samples']:,} samples in {len(tr['shards'])} shards, val "
         f"{va['samples']:,} samples, {tokens:,} tokens, seq_len {man['seq_len']}, tokenizer "
         f"{man.get('tokenizer_spec')} ({man['tokenizer_hash'][:12]}), vocabulary {man['vocab_size']:,}")
    problems = []
    if man["seq_len"] != t.seq_len:
        problems.append(f"prepared with seq_len={man['seq_len']} but train.seq_len={t.seq_len}")
    if man["vocab_size"] > cfg.model.vocab_size:
        problems.append(f"the shards' vocabulary ({man['vocab_size']:,}) exceeds model.vocab_size="
                        f"{cfg.model.vocab_size:,}")
    if t.val_every:
        val = validation_problem(man, str(d.shards), world)
        if val:
            problems.append(f"train.val_every={t.val_every} needs validation samples: {val}")
    for p in problems:
        _say(f"data: the run would stop: {p}")
