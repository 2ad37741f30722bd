"""What meta-learning adds, measured where it should show: few-shot adaptation on held-out text, at equal LM loss.

    python benchmarks/fewshot.py --vanilla runs/tradeoff/vanilla-s0 --hybrid runs/tradeoff/budget-0.1-s0
    python benchmarks/fewshot.py ... --episodes 300 --shapes 5x1,5x5,16x2 --out fewshot.json

The hybrid run's last checkpoint is matched with the vanilla checkpoint whose validation loss is nearest (one
definition for both: token-weighted next-token CE over the first `--val-batches` validation batches, the
evaluator's `validation_loss`); at equal steps the hybrid is the less-trained model, so equal steps would
compare unlike things. Both models then see the same episodes: N-way K-shot SMLMT episodes (Q = 2 queries per
class) sampled from the validation shards with the hybrid's meta settings (readout, window, frequency band),
from generators seeded in a range the training episodes never use. The token types themselves are the common
tokens training episodes draw from too: held-out text, not held-out classes.

Two readers of the frozen backbone's features per episode:
  * `inner`: a fresh meta head (built with a fixed seed, identical for both models) adapted by the same inner
    loop as the meta step (metalm.meta.fomaml, the run's head_init / feature_norm / inner_lr / inner_steps);
    the hybrid's own meta-trained head is not used, so only the backbone differs;
  * `probe`: multinomial logistic regression on the support features standardised by their own statistics,
    fitted to convergence (L-BFGS, L2 1e-3), a reader with no inner-loop hyper-parameters.
Reports per (N, K) and reader: accuracy of each model with a 95% confidence interval over episodes, and the
paired difference hybrid − vanilla with its 95% interval (normal approximation over episodes).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EPISODE_SEED = 7_000_000  # far from any (seed, step, micro, rank) hash input training uses
Q_QUERIES = 2


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        n, k = part.lower().split("x")
        out.append((int(n), int(k)))
    return out


def checkpoints(run: Path) -> list[Path]:
    from metalm.checkpoint import list_checkpoints

    return list_checkpoints(run / "checkpoints", warn=False)


def run_config(run: Path):
    """(config, special ids) of a run's last checkpoint, its data location made absolute (the state records it)."""
    from metalm.checkpoint import read_state
    from metalm.config import load_config

    ckpt = checkpoints(run)[-1]
    state = read_state(ckpt)
    cfg = load_config(ckpt / "config.yaml")
    cfg.data.shards = state.data_shards
    return cfg, state.special_ids


def val_batches(cfg, n: int, batch: int) -> list[torch.Tensor]:
    from metalm.data import build_loader

    loader = build_loader(cfg.data, split="val", seq_len=cfg.train.seq_len, micro_batch=batch, seed=0)
    out = []
    for i, b in enumerate(loader):
        if i >= n:
            break
        out.append(b)
    return out


def val_loss(model, batches) -> float:
    from metalm.eval.valloss import validation_loss

    with torch.no_grad():
        return validation_loss(model, batches)["val_loss"]


def match(vanilla: Path, hybrid: Path, batches) -> dict:
    """The hybrid's last checkpoint and the vanilla checkpoint of nearest validation loss."""
    from metalm.checkpoint.weights import load_model

    h_ckpt = checkpoints(hybrid)[-1]
    h_model, _ = load_model(h_ckpt)
    h_loss = val_loss(h_model, batches)
    best = None
    for c in checkpoints(vanilla):
        model, _ = load_model(c)
        loss = val_loss(model, batches)
        if best is None or abs(loss - h_loss) < abs(best[1] - h_loss):
            best = (c, loss, model)
    return {"hybrid": (h_ckpt, h_loss, h_model), "vanilla": best}


def sample_episodes(cfg, special: dict, batches, n_way: int, k_shot: int, count: int) -> list:
    """`count` episodes from the validation batches (4 batches joined per episode, so rare classes have
    occurrences), with the run's meta layout."""
    from metalm.meta.tasks import EpisodeError, sample_episode

    m, out, tries = cfg.meta, [], 0
    pool = torch.cat(batches)[:, :-1]
    mask_id = int(special["mask"])
    exclude = tuple(int(v) for v in special.values() if v is not None)
    while len(out) < count and tries < 4 * count:
        gen = torch.Generator().manual_seed(EPISODE_SEED + 1000 * n_way + 100_000 * k_shot + tries)
        rows = torch.randperm(pool.shape[0], generator=gen)[:32]
        tries += 1
        try:
            out.append(sample_episode(pool[rows], n_way=n_way, k_shot=k_shot, q_queries=Q_QUERIES, mask_id=mask_id,
                                      sampler="smlmt", generator=gen, min_freq=k_shot + Q_QUERIES,
                                      max_freq=m.max_token_freq, exclude_ids=exclude, readout=m.readout,
                                      readout_offset=m.readout_offset, window=m.window))
        except EpisodeError:
            continue
    return out


def features(model, ep) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        si, qi = ep.support_index, ep.query_index
        h_s = model.hidden_states(ep.support_ids)[si[:, 0], si[:, 1]].double()
        h_q = model.hidden_states(ep.query_ids)[qi[:, 0], qi[:, 1]].double()
    return h_s, h_q


def fresh_head(cfg, seed: int):
    """A newly initialised meta head (seeded, so every model is read by the same one), in eval mode."""
    from metalm.meta.head import build_head

    torch.manual_seed(seed)
    return build_head(cfg.meta, cfg.model.d_model, cfg.model.vocab_size).double().eval()


def inner_reader(model, cfg, ep, head) -> float:
    """Query accuracy after the meta step's inner loop (metalm.meta.fomaml, the run's settings) on `head`."""
    from metalm.meta.fomaml import meta_loss_with_stats

    m = cfg.meta
    with torch.no_grad():
        states = {id(ep.support_ids): model.hidden_states(ep.support_ids).double(),
                  id(ep.query_ids): model.hidden_states(ep.query_ids).double()}
    _, stats = meta_loss_with_stats(lambda ids: states[id(ids)], head, ep, inner_steps=m.inner_steps,
                                    inner_lr=m.inner_lr, head_init=m.head_init, feature_norm=m.feature_norm)
    return float(stats["query_acc"])


def probe_reader(h_s: torch.Tensor, y_s: torch.Tensor, h_q: torch.Tensor, y_q: torch.Tensor, n_way: int) -> float:
    """Logistic regression fitted to convergence on standardised support features; query accuracy."""
    mean, std = h_s.mean(0), h_s.std(0, unbiased=False).clamp_min(1e-6)
    xs, xq = (h_s - mean) / std, (h_q - mean) / std
    w = torch.zeros(xs.shape[1], n_way, dtype=xs.dtype, requires_grad=True)
    b = torch.zeros(n_way, dtype=xs.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y_s) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xq @ w + b).argmax(1) == y_q).float().mean())


def ci95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% normal interval of the mean)."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, 1.96 * sd / math.sqrt(len(values))


def compare_runs(vanilla: Path, hybrid: Path, *, episodes: int, shapes: list[tuple[int, int]],
                 val_batch_count: int = 16, progress: bool = True) -> dict:
    cfg, special = run_config(Path(hybrid))
    matched = match(Path(vanilla), Path(hybrid), val_batches(cfg, val_batch_count, 8))
    h_ckpt, h_loss, h_model = matched["hybrid"]
    v_ckpt, v_loss, v_model = matched["vanilla"]
    pool = val_batches(cfg, 64, 8)
    result = {"hybrid": {"checkpoint": str(h_ckpt), "val_loss": h_loss},
              "vanilla": {"checkpoint": str(v_ckpt), "val_loss": v_loss},
              "episodes_per_shape": episodes, "queries_per_class": Q_QUERIES, "shapes": {}, "gains": {}}
    for n_way, k_shot in shapes:
        eps = sample_episodes(cfg, special, pool, n_way, k_shot, episodes)
        acc = {("inner", "hybrid"): [], ("inner", "vanilla"): [], ("probe", "hybrid"): [], ("probe", "vanilla"): []}
        for i, ep in enumerate(eps):
            head = fresh_head(cfg, seed=i)
            for name, model in (("hybrid", h_model), ("vanilla", v_model)):
                acc[("inner", name)].append(inner_reader(model, cfg, ep, head))
                h_s, h_q = features(model, ep)
                acc[("probe", name)].append(probe_reader(h_s, ep.support_labels, h_q, ep.query_labels, n_way))
            if progress and (i + 1) % 50 == 0:
                print(f"fewshot {n_way}-way {k_shot}-shot: {i + 1}/{len(eps)} episodes", file=sys.stderr, flush=True)
        key = f"{n_way}x{k_shot}"
        entry = {"episodes": len(eps), "chance": 1.0 / n_way}
        for reader in ("inner", "probe"):
            for name in ("hybrid", "vanilla"):
                entry[f"{reader}/{name}"] = ci95(acc[(reader, name)])
            diff = ci95([a - b for a, b in zip(acc[(reader, "hybrid")], acc[(reader, "vanilla")])])
            entry[f"{reader}/diff"] = diff
            result["gains"][f"{reader} {key}"] = {"diff": diff[0], "ci95": diff[1],
                                                  "significant": abs(diff[0]) > diff[1]}
        result["shapes"][key] = entry
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vanilla", required=True, help="run directory of the vanilla run")
    p.add_argument("--hybrid", required=True, help="run directory of the hybrid run")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--shapes", default="5x1,5x5,16x2")
    p.add_argument("--out", default=None, help="JSON path (default HYBRID/fewshot.json)")
    args = p.parse_args(argv)
    res = compare_runs(Path(args.vanilla), Path(args.hybrid), episodes=args.episodes, shapes=parse_shapes(args.shapes))
    out = Path(args.out or Path(args.hybrid) / "fewshot.json")
    out.write_text(json.dumps(res, indent=1))
    print(f"matched: hybrid {res['hybrid']['checkpoint']} (val {res['hybrid']['val_loss']:.4f}) ~ vanilla "
          f"{res['vanilla']['checkpoint']} (val {res['vanilla']['val_loss']:.4f})")
    for key, e in res["shapes"].items():
        for reader in ("inner", "probe"):
            (h, hc), (v, vc), (d, dc) = e[f"{reader}/hybrid"], e[f"{reader}/vanilla"], e[f"{reader}/diff"]
            print(f"{key:>6} {reader:>5}: hybrid {h:.3f}±{hc:.3f}  vanilla {v:.3f}±{vc:.3f}  diff {d:+.3f}±{dc:.3f} "
                  f"(chance {e['chance']:.3f}, {e['episodes']} episodes)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
