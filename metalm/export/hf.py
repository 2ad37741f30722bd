"""Export a checkpoint to a Hugging Face folder loadable as a plain `LlamaForCausalLM`.

    metalm-export runs/cpu-tiny/checkpoints/step_00000300 --out exported/cpu-tiny

Our parameter names already are HF Llama's, and our RoPE uses HF's rotate-half convention, so export is a
config translation plus a safetensors copy; no `trust_remote_code` is needed to load the result.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from metalm.config import ModelConfig
from metalm.model.llama import Transformer


def llama_config_dict(cfg: ModelConfig, special_ids: dict | None = None) -> dict:
    special_ids = special_ids or {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
        "torch_dtype": "float32",
    }


def export_model(model: Transformer, out_dir: Path, tokenizer_json: Path | None = None,
                 special_ids: dict | None = None) -> Path:
    """Write config.json, model.safetensors and (when given) the tokenizer files into `out_dir`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(llama_config_dict(model.cfg, special_ids), indent=2))
    if tokenizer_json is not None and Path(tokenizer_json).is_file():
        shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.cfg.max_seq_len}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return out_dir


def export_checkpoint(ckpt: Path, out_dir: Path) -> Path:
    """Export a verified checkpoint. The special token ids are the ones the checkpoint records (checkpoints
    from before they were recorded: those of the manifest of the shards it trained on, when still there)."""
    from metalm.checkpoint import load_model, read_state

    model, _ = load_model(ckpt)
    state = read_state(ckpt)
    special = dict(state.special_ids)
    if not special and state.data_shards:
        manifest = Path(state.data_shards) / "manifest.json"
        if manifest.is_file():
            special = json.loads(manifest.read_text()).get("special_ids") or {}
    tok = Path(ckpt) / "tokenizer.json"
    return export_model(model, out_dir, tok if tok.is_file() else None, special)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a metalm checkpoint as a Hugging Face LlamaForCausalLM folder")
    p.add_argument("checkpoint", help="a complete checkpoint directory (…/checkpoints/step_XXXXXXXX)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    out = export_checkpoint(Path(args.checkpoint), Path(args.out))
    print(f"exported {args.checkpoint} -> {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
