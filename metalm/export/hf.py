"""Export a checkpoint to a Hugging Face folder loadable as a plain `LlamaForCausalLM`.

    metalm-export runs/cpu-tiny/checkpoints/step_00000300 --out exported/cpu-tiny
    metalm-export runs/cpu-tiny --out exported/cpu-tiny        # the run's newest complete checkpoint

The checkpoint is named as `metalm.checkpoint.locate` takes it: a checkpoint directory, or a run directory, its
checkpoints/ directory or its `latest` pointer (the newest complete checkpoint there); local or a URL (fetched
and verified first).

Everything in the folder is written by transformers itself: the model config (`LlamaConfig`), the weights
(our state dict loaded strictly into a `LlamaForCausalLM`, so every name and shape is checked, then
`save_pretrained`: safetensors, tied embeddings stored once), `generation_config.json` (BOS/EOS/pad ids) and
the tokenizer (`PreTrainedTokenizerFast` over the run's tokenizer.json, with its BOS, EOS, pad and mask
tokens, padding on the left for batched generation). Our parameter names already are HF Llama's and our RoPE
uses HF's rotate-half convention, so no `trust_remote_code` is needed to load the result.

The special token ids are the ones the checkpoint's trainer state records (the ids the run trained with);
checkpoints written before they were recorded fall back to the manifest of the shards they trained on.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
from pathlib import Path

import torch

from metalm.checkpoint import TOKENIZER_FILE, CheckpointError, load_model, locate, read_state
from metalm.config import ModelConfig
from metalm.storage import describe
from metalm.model.llama import Transformer

ROLES = ("bos", "eos", "pad", "mask")


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as it is: the message says what is missing or inconsistent."""


def llama_config(cfg: ModelConfig, special_ids: dict | None = None):
    """The `transformers.LlamaConfig` of our model config (special token ids where known, None where not)."""
    from transformers import LlamaConfig

    special_ids = special_ids or {}
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.d_model // cfg.n_heads, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        initializer_range=cfg.init_std, bos_token_id=special_ids.get("bos"), eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"), architectures=["LlamaForCausalLM"],
    )
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers 5
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    else:  # transformers 4.x
        kwargs["rope_theta"] = float(cfg.rope_theta)
    return LlamaConfig(**kwargs)


def hf_model(model: Transformer, special_ids: dict | None = None):
    """A `LlamaForCausalLM` holding `model`'s weights (fp32, on the CPU), loaded strictly: a name or shape
    that HF's Llama does not have is an ExportError, never a silently re-initialised tensor."""
    from transformers import GenerationConfig, LlamaForCausalLM

    config = llama_config(model.cfg, special_ids)
    with torch.device("cpu"):
        hf = LlamaForCausalLM(config)
    state = {k: v.detach().to(device="cpu", dtype=torch.float32) for k, v in model.state_dict().items()}
    try:
        hf.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"the model's weights do not fit HF's LlamaForCausalLM: {str(e).strip()[:500]}") from None
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    special_ids = special_ids or {}
    hf.generation_config = GenerationConfig(bos_token_id=special_ids.get("bos"), eos_token_id=special_ids.get("eos"),
                                            pad_token_id=special_ids.get("pad"))
    return hf.eval()


def hf_tokenizer(tokenizer_json: Path, special_ids: dict, model_max_length: int):
    """A `PreTrainedTokenizerFast` over `tokenizer_json` whose BOS/EOS/pad/mask tokens are the strings of the
    ids the run trained with."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(tokenizer_json))
    tokens: dict[str, str | None] = {}
    for role in ROLES:
        tid = special_ids.get(role)
        if tid is None:
            tokens[role] = None
            continue
        text = backend.id_to_token(int(tid))
        if text is None or backend.token_to_id(text) != int(tid):
            raise ExportError(f"{tokenizer_json}: the checkpoint's {role} token id {tid} is not a token of this "
                              f"tokenizer (vocabulary of {backend.get_vocab_size()})")
        tokens[role] = text
    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json), bos_token=tokens["bos"], eos_token=tokens["eos"],
        pad_token=tokens["pad"], mask_token=tokens["mask"], model_max_length=model_max_length,
        padding_side="left",  # decoder-only: batched generation continues every prompt from its last token
        clean_up_tokenization_spaces=False,  # decode exactly what was encoded (training never cleaned up)
    )


def export_model(model: Transformer, out_dir: Path, tokenizer_json: Path | None = None,
                 special_ids: dict | None = None) -> Path:
    """Write the model (config.json, model.safetensors, generation_config.json) and, when `tokenizer_json` is
    given, the tokenizer (tokenizer.json, tokenizer_config.json, special tokens) into `out_dir`."""
    out_dir = Path(out_dir)
    special_ids = {k: int(v) for k, v in (special_ids or {}).items() if k in ROLES and v is not None}
    tok = hf_tokenizer(Path(tokenizer_json), special_ids, model.cfg.max_seq_len) if tokenizer_json else None
    hf = hf_model(model, special_ids)  # both checked before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    if tok is not None:
        tok.save_pretrained(str(out_dir))
    return out_dir


def checkpoint_special_ids(ckpt: Path) -> dict:
    """The special token ids of a checkpoint: its trainer state's, else (older checkpoints) those of the
    manifest of the shards it trained on, when that is still there; {} when neither knows."""
    state = read_state(ckpt)
    special = dict(state.special_ids)
    if not special and state.data_shards:
        manifest = Path(state.data_shards) / "manifest.json"
        if manifest.is_file():
            special = json.loads(manifest.read_text()).get("special_ids") or {}
    return special


def export_checkpoint(ckpt: Path, out_dir: Path) -> Path:
    """Export a verified checkpoint (its weights are checked against the COMPLETE marker first)."""
    ckpt = Path(ckpt)
    model, _ = load_model(ckpt)
    tok = ckpt / TOKENIZER_FILE
    return export_model(model, out_dir, tok if tok.is_file() else None, checkpoint_special_ids(ckpt))


def export_located(given: str, out_dir: Path) -> tuple[str, Path]:
    """Export the checkpoint `given` names (see `metalm.checkpoint.locate`); (its location, the output folder).
    A checkpoint behind a URL is fetched into a temporary directory and verified there first."""
    store, name = locate(given)
    where = store.where(name)
    if store.store.local:
        return where, export_checkpoint(store.store.path(name), out_dir)
    with tempfile.TemporaryDirectory(prefix="metalm-export-") as tmp:
        return where, export_checkpoint(store.download(name, Path(tmp), checksums=True), out_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="metalm-export",
                                description="Export a metalm checkpoint as a Hugging Face LlamaForCausalLM folder")
    p.add_argument("checkpoint", help="a checkpoint directory (…/checkpoints/step_XXXXXXXX), or a run directory, its "
                                      "checkpoints/ directory or its latest pointer (the newest complete checkpoint)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    try:
        where, out = export_located(args.checkpoint, Path(args.out))
    except (CheckpointError, ExportError) as e:
        print(f"metalm-export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a URL that cannot be read (network, credentials, missing package)
        print(f"metalm-export: error: {args.checkpoint}: {describe(e)}", file=sys.stderr)
        return 2
    has_tok = (out / "tokenizer_config.json").is_file()
    print(f"exported {where} -> {out}: load with transformers.AutoModelForCausalLM.from_pretrained"
          + (" and AutoTokenizer.from_pretrained" if has_tok else " (no tokenizer.json in the checkpoint)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
