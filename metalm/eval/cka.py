"""Linear CKA between consecutive checkpoints' activations (the `cka` metric).

Linear centred kernel alignment (Kornblith et al., 2019) of two activation matrices X (n x p) and Y (n x q)
taken on the same n tokens, with every column centred:

    CKA(X, Y) = ||Yᵀ X||_F² / (||Xᵀ X||_F · ||Yᵀ Y||_F)

It lies in [0, 1], is 1 for Y = X, and is invariant to an orthogonal transform and to an isotropic scaling of
either matrix. Per layer, X is the residual-stream output of the checkpoint evaluated and Y that of the previous
evaluated checkpoint (the nearest earlier step with saved activations), on the same rows of the fixed probe batch.

The evaluator evaluates checkpoints one at a time, maybe in another process than the one that evaluated the
previous checkpoint, so each evaluation saves the activations it compares into the results directory,
`RESULTS/activations/step_XXXXXXXX.safetensors`: for each layer, `eval.cka_tokens` rows of the (B·T, d_model)
matrix, evenly strided, in float32, with the probe batch's sha256 and the rows' count in the file's metadata.
CKA is computed from the two saved files only, so evaluating a checkpoint again (after a crash, `--force`, or in
a later pass) gives the same numbers as the first time. A previous file taken on another probe batch (other
eval.* settings or data) or with another layer shape is not compared: the metric is skipped, saying why.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from metalm.eval.layers import layer_outputs
from metalm.fsutil import write_atomic

ACT_DIR = "activations"
_FILE_RE = re.compile(r"step_(\d{8})\.safetensors")


def _centred(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (n, p) and (n, q) matrices whose rows are the same n examples."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear CKA needs two 2-D matrices with the same rows, got shapes {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x, y = _centred(x), _centred(y)
    denom = float(torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))
    if denom == 0.0:
        raise ValueError("linear CKA of a matrix whose columns are all constant is undefined")
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2) / denom


def probe_digest(probe: torch.Tensor) -> str:
    """sha256 of the probe batch's token ids (int64, row-major): which rows the saved activations are of."""
    return hashlib.sha256(probe.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def row_subset(n_rows: int, n: int) -> torch.Tensor:
    """`n` row indices spread evenly over 0..n_rows-1 (all rows when n >= n_rows)."""
    if n >= n_rows:
        return torch.arange(n_rows)
    return torch.div(torch.arange(n) * n_rows, n, rounding_mode="floor")


@torch.no_grad()
def layer_activations(model, input_ids: torch.Tensor, n_rows: int) -> list[torch.Tensor]:
    """Each layer's residual-stream output on `input_ids` as (B·T, d_model) float32 rows on the CPU, `n_rows`
    of them (see `row_subset`)."""
    rows = row_subset(input_ids.numel(), n_rows)
    return [h[rows.to(h.device)].cpu().contiguous() for h in layer_outputs(model, input_ids)]


def activation_path(results: Path, step: int) -> Path:
    return Path(results) / ACT_DIR / f"step_{step:08d}.safetensors"


def save_activations(results: Path, step: int, acts: list[torch.Tensor], digest: str) -> Path:
    """Write the activations of the checkpoint at `step` atomically (tmp + rename)."""
    from safetensors.torch import save

    path = activation_path(results, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save({f"L{i}": a for i, a in enumerate(acts)},
                            metadata={"probe_sha256": digest, "step": str(step)}))
    return path


def load_activations(path: Path) -> tuple[list[torch.Tensor], str]:
    """(the per-layer activations, the probe's sha256) saved in `path`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        names = sorted(f.keys(), key=lambda k: int(k[1:]))
        return [f.get_tensor(k) for k in names], meta.get("probe_sha256", "")


def previous_step(results: Path, step: int) -> int | None:
    """The largest step below `step` whose activations are saved in `results`, or None."""
    folder = Path(results) / ACT_DIR
    steps = [int(m.group(1)) for p in folder.glob("step_*.safetensors") if (m := _FILE_RE.fullmatch(p.name))] \
        if folder.is_dir() else []
    earlier = [s for s in steps if s < step]
    return max(earlier) if earlier else None


def cka_to_previous(results: Path, step: int, acts: list[torch.Tensor], digest: str) -> tuple[dict | None, str]:
    """Save this checkpoint's activations, then CKA per layer against the previous saved checkpoint's:
    ({"prev_step", "layers": [cka per layer], "mean"}, "") or (None, why it cannot be computed)."""
    save_activations(results, step, acts, digest)
    prev = previous_step(results, step)
    if prev is None:
        return None, (f"no earlier checkpoint's activations in {Path(results) / ACT_DIR} (the first one evaluated, "
                      f"or the earlier files were deleted)")
    path = activation_path(results, prev)
    prev_acts, prev_digest = load_activations(path)
    if prev_digest != digest:
        return None, (f"{path} was taken on another probe batch (sha256 {prev_digest[:12]}, now {digest[:12]}): "
                      f"the eval.* settings or the data differ from that evaluation's")
    mine = load_activations(activation_path(results, step))[0]  # what was saved: a re-run reads the same numbers
    if [tuple(a.shape) for a in prev_acts] != [tuple(a.shape) for a in mine]:
        return None, (f"{path} holds activations of shapes {[tuple(a.shape) for a in prev_acts]}, this checkpoint "
                      f"{[tuple(a.shape) for a in mine]} (another model shape or eval.cka_tokens)")
    layers = [linear_cka(a, b) for a, b in zip(mine, prev_acts)]
    return {"prev_step": prev, "layers": layers, "mean": sum(layers) / len(layers)}, ""


def flatten(prefix: str, result: dict) -> dict[str, float]:
    """{"cka/mean": ..., "cka/prev_step": ..., "cka/L0": ...} for logging."""
    flat = {f"{prefix}/mean": float(result["mean"]), f"{prefix}/prev_step": float(result["prev_step"])}
    flat.update({f"{prefix}/L{i}": float(v) for i, v in enumerate(result["layers"])})
    return flat
