"""What the per-layer metrics read off a model: each decoder block's weight matrices by kind, and each layer's
residual-stream output on a probe batch (effective rank, matrix statistics and CKA all read these)."""
from __future__ import annotations

import torch

ATTN_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_KINDS = ("gate_proj", "up_proj", "down_proj")
KINDS = ATTN_KINDS + MLP_KINDS


def block_matrices(model, layer: int) -> dict[str, torch.nn.Parameter]:
    """The weight of every kind in KINDS of decoder block `layer`."""
    block = model.model.layers[layer]
    return {
        "q_proj": block.self_attn.q_proj.weight, "k_proj": block.self_attn.k_proj.weight,
        "v_proj": block.self_attn.v_proj.weight, "o_proj": block.self_attn.o_proj.weight,
        "gate_proj": block.mlp.gate_proj.weight, "up_proj": block.mlp.up_proj.weight,
        "down_proj": block.mlp.down_proj.weight,
    }


@torch.no_grad()
def layer_outputs(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's residual-stream output on `input_ids` as one (B·T, d_model) float32 matrix, computed in eval
    mode (the model's training flag is restored after)."""
    was_training = model.training
    model.eval()
    try:
        _, per_layer = model.hidden_states(input_ids, all_layers=True)
    finally:
        model.train(was_training)
    return [h.reshape(-1, h.shape[-1]).float() for h in per_layer]
