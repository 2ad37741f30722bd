"""Episodes for the meta step: subset-masked LM tasks (SMLMT) built from a batch of token sequences.

Two samplers, both pure functions of (input_ids, arguments, generator):

* ``smlmt`` (ours): a real N-way K-shot task. N distinct token types are drawn from the batch, and each
  gets K support and Q query occurrences at distinct (row, position) pairs, replaced by the mask token.
  Labels are way indices under a fresh random order each episode, so "class 0" means nothing across episodes.
* ``reference``: the construction of the paper's code, reproduced on purpose (PAPER.md section 1.2) so its
  behaviour can be measured. It is *not* N-way K-shot; see `_sample_reference`.

Sampling is data-dependent (counts, nonzero, unique), so it runs wherever ``generator`` lives (normally the
CPU, on a (B, T) batch of ints: cheap) and the episode is moved to ``input_ids.device`` at the end. Position 0
is never chosen: a causal decoder sees no context there, only the mask token.

Where the head reads (``readout``, smlmt only). ``mask`` (the paper): the state at the masked position, in two
masked copies of the batch (all support masks in one, all query masks in the other). A causal decoder sees only
the left context there, so the head's inputs are mostly the mask embedding. ``after``: the state
``readout_offset`` tokens after the mask, which has seen the right context too (a decoder's analogue of an
encoder reading the whole sentence); ``prev``: the unmasked state just before the mask (next-token prediction
of the class token). Both give every occurrence its own window of ``window`` tokens of its row holding one mask,
so no readout ever sees another occurrence's mask. ``support_index``/``query_index`` always point at the
readout positions.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from collections.abc import Sequence

import torch

from metalm.config import META_READOUTS as READOUTS
from metalm.config import META_SAMPLERS as SAMPLERS


class EpisodeError(ValueError):
    """The batch cannot supply the requested episode (too few eligible token types or positions)."""


@dataclass
class Episode:
    """One N-way episode over a (B, T) batch.

    ``support_index``/``query_index`` hold (row, position) pairs into ``support_ids``/``query_ids``, where
    those positions hold the mask id; ``*_labels`` are way indices in 0..N-1 and ``classes[i]`` is the
    token id of way i. ``rows`` and ``way_row`` describe the output-layer rows the head uses: ``rows`` are
    the distinct token ids among ``classes`` and ``classes[i] == rows[way_row[i]]``. They differ from
    ``classes``/``arange(N)`` only when ``classes`` repeats an id (the reference sampler's random padding
    can), in which case repeated ways share one row exactly as the paper's column slicing does.
    """

    support_ids: torch.Tensor
    support_index: torch.Tensor
    support_labels: torch.Tensor
    query_ids: torch.Tensor
    query_index: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor
    rows: torch.Tensor | None = None  # derived from classes when not given
    way_row: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.rows is None or self.way_row is None:
            rows, way_row = torch.unique(self.classes, return_inverse=True)
            if rows.numel() == self.classes.numel():  # no repeats: keep the classes' own order
                rows, way_row = self.classes.clone(), torch.arange(rows.numel(), device=rows.device)
            self.rows, self.way_row = rows, way_row

    @property
    def n_way(self) -> int:
        return int(self.classes.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        return Episode(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


def sample_episode(input_ids: torch.Tensor, *, n_way: int, k_shot: int, q_queries: int, mask_id: int,
                   sampler: str, generator: torch.Generator, min_freq: int = 1, max_freq: int = 0,
                   exclude_ids: Sequence[int] = (), vocab_size: int | None = None,
                   allowed: torch.Tensor | None = None, readout: str = "mask", readout_offset: int = 4,
                   window: int = 32) -> Episode:
    """Build one episode from ``input_ids`` (B, T) with the named sampler; see the module docstring.

    ``smlmt``: ``min_freq``/``max_freq`` (0 = unbounded) bound a token type's count over the whole batch;
    ``exclude_ids`` (and ``mask_id`` itself) are never classes; ``allowed`` (a bool tensor over token ids, e.g.
    the word-start tokens) restricts the classes further; ``readout``/``readout_offset``/``window`` lay the
    episode out (module docstring). Raises `EpisodeError` when fewer than ``n_way`` token types are eligible.
    ``reference``: ``q_queries``, the frequency band and ``exclude_ids`` are ignored, as in the paper's code;
    ``vocab_size`` (default: max id in the batch + 1) bounds the random padding ids.
    """
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids: expected a (B, T) int64 tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
    if n_way < 1 or k_shot < 1 or q_queries < 1:
        raise ValueError(f"n_way={n_way}, k_shot={k_shot}, q_queries={q_queries}: expected positive integers")
    work = generator.device
    ids = input_ids.to(work)
    if sampler == "smlmt":
        T = ids.shape[1]
        if readout not in READOUTS:
            raise ValueError(f"readout={readout!r}: expected one of {', '.join(READOUTS)}")
        window = min(window, T)  # a window never exceeds the sequences it is cut from
        if readout != "mask" and window < 2:
            raise ValueError(f"window={window}: expected >= 2")
        if readout == "after" and window <= readout_offset:
            raise EpisodeError(f"smlmt: a {window}-token window cannot hold a mask and the {readout_offset} "
                               f"tokens after it (meta.readout_offset) in sequences of {T}")
        last = T - 1 - (readout_offset if readout == "after" else 0)  # the readout stays inside the row
        occ = _sample_smlmt(ids, n_way, k_shot, q_queries, mask_id, generator, min_freq, max_freq, exclude_ids,
                            allowed, last)
        ep = _masked_copies(ids, occ, mask_id) if readout == "mask" else \
            _windows(ids, occ, mask_id, readout, readout_offset, window)
    elif sampler == "reference":
        ep = _sample_reference(ids, n_way, k_shot, mask_id, generator, vocab_size)
    else:
        raise ValueError(f"sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
    return ep.to(input_ids.device)


def _group_rank(keys: torch.Tensor) -> torch.Tensor:
    """For keys already sorted (equal keys contiguous): each element's index within its run of equal keys."""
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(keys.numel(), device=keys.device) - torch.repeat_interleave(starts, counts)


def _sort_by(order: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Re-order the permutation ``order`` stably by ``key[order]`` (successive calls build a lexicographic sort)."""
    return order[torch.sort(key[order], stable=True).indices]


@dataclass
class _Occurrences:
    """The chosen occurrences of an smlmt episode: (row, position, way) of each support and query one."""

    classes: torch.Tensor
    support: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    query: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _sample_smlmt(ids: torch.Tensor, n_way: int, k_shot: int, q_queries: int, mask_id: int,
                  gen: torch.Generator, min_freq: int, max_freq: int, exclude_ids: Sequence[int],
                  allowed: torch.Tensor | None, last: int) -> _Occurrences:
    B, T = ids.shape
    dev = ids.device
    need = k_shot + q_queries
    size = max(int(ids.max()) + 1, mask_id + 1)
    if last < 1:
        raise EpisodeError(f"smlmt: sequences of {T} tokens leave no position for a mask with its readout")
    # Candidate occurrences: every (row, position) in 1..last.
    tok = ids[:, 1:last + 1].reshape(-1)
    row = torch.arange(B, device=dev).repeat_interleave(last)
    pos = torch.arange(1, last + 1, device=dev).repeat(B)

    freq = torch.bincount(ids.reshape(-1), minlength=size)  # the band is counted over the whole batch
    avail = torch.bincount(tok, minlength=size)
    eligible = (freq >= min_freq) & (avail >= need)
    if max_freq > 0:
        eligible &= freq <= max_freq
    banned = torch.tensor([i for i in (*exclude_ids, mask_id) if 0 <= i < size], dtype=torch.long, device=dev)
    eligible[banned] = False
    if allowed is not None:
        ok = torch.zeros(size, dtype=torch.bool, device=dev)
        n = min(size, allowed.numel())
        ok[:n] = allowed[:n].to(dev)
        eligible &= ok
    candidates = eligible.nonzero().squeeze(1)
    if candidates.numel() < n_way:
        band = f"[{min_freq}, {max_freq if max_freq > 0 else 'inf'}]"
        raise EpisodeError(
            f"smlmt: found {candidates.numel()} eligible token types, need n_way={n_way} (each with batch "
            f"frequency in {band} and >= k_shot+q_queries={need} occurrences at positions 1..{last}, excluding "
            f"{len(banned)} special ids{' and the tokens meta.classes leaves out' if allowed is not None else ''}) "
            f"in a batch of {B}x{T}; use larger batches or fewer ways/shots"
        )
    # A random subset in random order: way i <-> classes[i], so labels are permuted every episode.
    classes = candidates[torch.randperm(candidates.numel(), generator=gen, device=dev)[:n_way]]

    way_of = torch.full((size,), -1, dtype=torch.long, device=dev)
    way_of[classes] = torch.arange(n_way, device=dev)
    w = way_of[tok]
    keep = w >= 0
    w, row, pos = w[keep], row[keep], pos[keep]
    # Spread each class over sequences: order its occurrences round-robin over rows (every row's first
    # occurrence, in random order, then every row's second, ...) and take the first K+Q of that order.
    u = torch.rand(w.numel(), generator=gen, device=dev)
    order = torch.argsort(u)
    order = _sort_by(order, w * B + row)
    within_row = torch.empty_like(order)
    within_row[order] = _group_rank(w[order] * B + row[order])
    order = torch.argsort(u)
    order = _sort_by(order, within_row)
    order = _sort_by(order, w)
    rank = _group_rank(w[order])
    support = order[rank < k_shot]
    query = order[(rank >= k_shot) & (rank < need)]
    return _Occurrences(classes, (row[support], pos[support], w[support]), (row[query], pos[query], w[query]))


def _masked_copies(ids: torch.Tensor, occ: _Occurrences, mask_id: int) -> Episode:
    """readout=mask: all support masks in one copy of the batch, all query masks in another (the paper's layout)."""
    (rs, ps, ys), (rq, pq, yq) = occ.support, occ.query
    support_ids, query_ids = ids.clone(), ids.clone()
    support_ids[rs, ps] = mask_id
    query_ids[rq, pq] = mask_id
    n_way = occ.classes.numel()
    return Episode(support_ids=support_ids, support_index=torch.stack([rs, ps], 1), support_labels=ys,
                   query_ids=query_ids, query_index=torch.stack([rq, pq], 1), query_labels=yq,
                   classes=occ.classes, rows=occ.classes.clone(), way_row=torch.arange(n_way, device=ids.device))


def _window_rows(ids: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, mask_id: int, readout: str, offset: int,
                 window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (window,)-token slice of its row per occurrence, ending at the readout position where the row allows,
    with the occurrence's own position masked; returns the slices and the readout index in each."""
    T = ids.shape[1]
    read = pos + offset if readout == "after" else pos - 1
    start = (read - window + 1).clamp(0, T - window)
    cols = start[:, None] + torch.arange(window, device=ids.device)[None, :]
    rows = ids[row[:, None], cols].clone()
    at = pos - start
    inside = at < window  # readout=prev: the mask falls outside a window that ends before it
    rows[torch.arange(row.numel(), device=ids.device)[inside], at[inside]] = mask_id
    return rows, read - start


def _windows(ids: torch.Tensor, occ: _Occurrences, mask_id: int, readout: str, offset: int, window: int) -> Episode:
    (rs, ps, ys), (rq, pq, yq) = occ.support, occ.query
    support_ids, s_read = _window_rows(ids, rs, ps, mask_id, readout, offset, window)
    query_ids, q_read = _window_rows(ids, rq, pq, mask_id, readout, offset, window)
    dev = ids.device
    n_way = occ.classes.numel()
    return Episode(support_ids=support_ids,
                   support_index=torch.stack([torch.arange(rs.numel(), device=dev), s_read], 1), support_labels=ys,
                   query_ids=query_ids, query_index=torch.stack([torch.arange(rq.numel(), device=dev), q_read], 1),
                   query_labels=yq, classes=occ.classes, rows=occ.classes.clone(),
                   way_row=torch.arange(n_way, device=dev))


def _last_match(values: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Index of the last entry of ``classes`` equal to each value, or -1 where there is none."""
    eq = values[:, None] == classes[None, :]
    idx = torch.arange(classes.numel(), device=classes.device).expand_as(eq)
    return torch.where(eq, idx, torch.full_like(idx, -1)).amax(1)


def _sample_reference(ids: torch.Tensor, n_way: int, k_shot: int, mask_id: int, gen: torch.Generator,
                      vocab_size: int | None) -> Episode:
    """The paper code's construction (pico-maml-train ``trainer.py``), flaws included on purpose.

    * ``perm = randperm(T-1) + 1``; support positions ``perm[:K]`` are the same K columns in every row and
      the query position ``perm[K]`` is one column, the same for every row (B queries in all).
    * ``classes`` = the sorted distinct support tokens; if fewer than N, padded with ``randint(0, vocab)``
      ids (which may repeat existing ones); if more, a random subset of N in random order
      (``uniq[randperm(U)[:N]]``).
    * Labels: token -> way index (a repeated id maps to its last way, as ``mapper[classes] = arange(N)``
      writes it); every token outside ``classes`` -- support tokens dropped by the cut and, commonly, the
      query token -- is mapped to class 0.

    Consequence: most query labels are 0. While B*K <= N (the paper's small/medium/large runs, B*K = 32)
    the classes keep sorted order, class 0 is the lowest token id among them, and a head that always
    predicts that class scores about 0.5 query accuracy or more without learning anything (PAPER.md 4.2;
    0.83 measured on English Wikipedia leads at B=8, T=512, K=4, N=32). Only the random order after a cut
    (tiny, B*K = 64) hides which column is class 0 (that shortcut then scores 0.08 at B=16, though 82% of
    query labels are still 0). Episodic accuracies of this sampler must be read against that shortcut
    baseline, not against chance 1/N. Labels stay tied to token ids (no per-episode permutation).
    ``q_queries`` and frequency bounds are ignored, as in the paper's code.
    """
    B, T = ids.shape
    dev = ids.device
    if k_shot + 1 > T - 1:
        raise EpisodeError(f"reference: sequence length {T} leaves {T - 1} positions, need k_shot+1={k_shot + 1}")
    vocab = vocab_size if vocab_size is not None else int(ids.max()) + 1
    perm = torch.randperm(T - 1, generator=gen, device=dev) + 1
    sup_pos, q_pos = perm[:k_shot], perm[k_shot]
    raw_support = ids[:, sup_pos].reshape(-1)  # row-major: (row 0, perm[0]), (row 0, perm[1]), ...
    raw_query = ids[:, q_pos]
    uniq = torch.unique(raw_support)  # sorted
    classes = uniq
    if uniq.numel() < n_way:
        pad = torch.randint(0, vocab, (n_way - uniq.numel(),), generator=gen, device=dev)
        classes = torch.cat([uniq, pad])
    elif uniq.numel() > n_way:
        classes = uniq[torch.randperm(uniq.numel(), generator=gen, device=dev)[:n_way]]
    support_labels = _last_match(raw_support, classes).clamp_min(0)  # the class-0 artifact
    query_labels = _last_match(raw_query, classes).clamp_min(0)

    support_ids, query_ids = ids.clone(), ids.clone()
    support_ids[:, sup_pos] = mask_id
    query_ids[:, q_pos] = mask_id
    r = torch.arange(B, device=dev)
    return Episode(
        support_ids=support_ids,
        support_index=torch.stack([r.repeat_interleave(k_shot), sup_pos.repeat(B)], 1),
        support_labels=support_labels,
        query_ids=query_ids,
        query_index=torch.stack([r, q_pos.expand(B)], 1),
        query_labels=query_labels,
        classes=classes,  # rows / way_row derived in __post_init__ (classes may repeat ids)
    )
