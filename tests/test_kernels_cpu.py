"""kernels.cpu (the CPU production path of the cross-entropies) against the plain references: values and every
gradient, odd shapes, several chunks with a ragged tail, fp32 and bf16, ignored rows, label smoothing, z-loss,
non-finite inputs, grad_output other than 1, backward twice, no_grad, and the dispatch that selects it."""
from __future__ import annotations

import functools

import pytest
import torch

import kernels
from kernel_cases import BF16, F32, make_targets, randn, run_both
from kernels import cpu
from kernels import reference as ref
from kernels.tolerance import assert_close

def ce_chunk(rows, vocab):
    """chunk_bytes giving `rows` rows per chunk"""
    return rows * vocab * 4


# ------------------------------------------------------------------------------ masked_cross_entropy


@pytest.mark.parametrize("lead,vocab,rows", [((5,), 37, 2), ((2, 3), 37, 4), ((7,), 300, 3), ((3,), 1000, 64)])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ls,zl", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_ce_matches_reference(lead, vocab, rows, dtype, reduction, ls, zl):
    logits = randn(*lead, vocab, dtype=dtype, scale=3.0)
    targets = make_targets(lead, vocab)
    (loss, (dz,)), (loss_ref, (dz_ref,)) = run_both(
        cpu.masked_cross_entropy, ref.masked_cross_entropy, [logits, targets],
        new_kw={"chunk_bytes": ce_chunk(rows, vocab)}, reduction=reduction, label_smoothing=ls, z_loss=zl)
    assert loss.dtype == F32 and dz.dtype == dtype
    assert_close(loss, loss_ref, F32 if dtype == F32 else BF16)
    assert_close(dz, dz_ref, dtype)


def test_ce_ignore_index_that_is_a_class_and_all_ignored():
    logits, t = randn(7, 11), make_targets((7,), 11, ignore_index=5)
    (loss, (dz,)), (loss_ref, (dz_ref,)) = run_both(
        cpu.masked_cross_entropy, ref.masked_cross_entropy, [logits, t], new_kw={"chunk_bytes": ce_chunk(3, 11)},
        ignore_index=5, label_smoothing=0.1, z_loss=1e-3)
    assert_close(loss, loss_ref)
    assert_close(dz, dz_ref)
    for reduction in ("mean", "sum", "none"):
        z = randn(2, 3, 37).requires_grad_()
        loss = cpu.masked_cross_entropy(z, torch.full((2, 3), -100), reduction=reduction, label_smoothing=0.1,
                                        z_loss=1e-3)
        loss.sum().backward()
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(z.grad, torch.zeros_like(z))


def test_ce_large_logits_and_minus_inf_columns():
    logits = randn(6, 300, scale=1e4)
    logits[:, 16:40] = float("-inf")
    logits[2, :200] = float("-inf")
    t = torch.tensor([3, 1, 245, -100, 7, 299])
    (loss, (dz,)), (loss_ref, (dz_ref,)) = run_both(
        cpu.masked_cross_entropy, ref.masked_cross_entropy, [logits, t], new_kw={"chunk_bytes": ce_chunk(4, 300)},
        reduction="none", label_smoothing=0.0, z_loss=1e-4)
    assert loss.isfinite().all() and dz.isfinite().all()
    assert_close(loss, loss_ref)
    assert_close(dz, dz_ref)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("ls,zl", [(0.0, 0.0), (0.1, 1e-3)])
def test_ce_non_finite_like_reference_and_ignored_rows_nan_safe(reduction, ls, zl):
    logits = randn(6, 37)
    t = torch.tensor([1, 2, 3, -100, 5, 6])
    logits[0, 7] = float("nan")    # NaN in a valid row: that row's loss and gradient are NaN
    logits[3, 0] = float("nan")    # NaN in an ignored row: must not leak anywhere
    logits[1, 30] = float("inf")   # +inf: lse = inf, like torch.logsumexp
    logits[2, :] = float("-inf")   # all -inf: lse = -inf, loss NaN
    (loss, (dz,)), (loss_ref, (dz_ref,)) = run_both(
        cpu.masked_cross_entropy, ref.masked_cross_entropy, [logits, t], new_kw={"chunk_bytes": ce_chunk(4, 37)},
        reduction=reduction, label_smoothing=ls, z_loss=zl)
    assert_close(loss, loss_ref, equal_nan=True)
    assert_close(dz, dz_ref, equal_nan=True)
    assert torch.equal(dz[3], torch.zeros_like(dz[3]))
    assert dz[4:].isfinite().all()


def test_ce_nan_in_ignored_rows_only_keeps_everything_finite():
    # The case F.cross_entropy gets wrong: its log_softmax backward turns an ignored row's NaN into NaN grads.
    logits = randn(8, 50)
    t = make_targets((8,), 50, ignore_frac=0.0)
    t[[1, 6]] = -100
    logits[1] = float("nan")
    logits[6, 3] = float("inf")
    z = logits.clone().requires_grad_()
    loss = cpu.masked_cross_entropy(z, t, label_smoothing=0.1, z_loss=1e-3, chunk_bytes=ce_chunk(3, 50))
    loss.backward()
    assert loss.isfinite() and z.grad.isfinite().all()
    assert torch.equal(z.grad[[1, 6]], torch.zeros(2, 50))
    assert_close(loss.detach(), ref.masked_cross_entropy(logits, t, label_smoothing=0.1, z_loss=1e-3))


def test_ce_out_of_range_target_raises_like_reference():
    z = randn(3, 37)
    for bad in (37, -7):
        t = torch.tensor([1, bad, 2])
        with pytest.raises((RuntimeError, IndexError)):
            ref.masked_cross_entropy(z, t)
        with pytest.raises((RuntimeError, IndexError)):
            cpu.masked_cross_entropy(z, t)


def test_ce_backward_twice_and_logits_used_twice():
    """The gradient is formed in the forward and rescaled in place by the first backward: a retained graph's
    second backward must give the same gradient, and one handed out before must not change."""
    z0, t = randn(9, 41, scale=2.0), make_targets((9,), 41)
    z = z0.clone().requires_grad_()
    zr = z0.clone().requires_grad_()
    loss = cpu.masked_cross_entropy(z * 1.0, t, chunk_bytes=ce_chunk(4, 41))
    loss_ref = ref.masked_cross_entropy(zr * 1.0, t)
    (g1,) = torch.autograd.grad(3.0 * loss, z, retain_graph=True)
    g1_copy = g1.clone()
    (g2,) = torch.autograd.grad(0.5 * loss, z, retain_graph=True)
    (g3,) = torch.autograd.grad(0.5 * loss, z)
    (r1,) = torch.autograd.grad(3.0 * loss_ref, zr, retain_graph=True)
    (r2,) = torch.autograd.grad(0.5 * loss_ref, zr)
    assert torch.equal(g1, g1_copy)
    assert_close(g1, r1)
    assert_close(g2, r2)
    assert torch.equal(g2, g3)
    # logits feeding the CE and another term: both gradients add up
    z.grad = None
    zr.grad = None
    (cpu.masked_cross_entropy(z, t) + z.pow(2).mean()).backward()
    (ref.masked_cross_entropy(zr, t) + zr.pow(2).mean()).backward()
    assert_close(z.grad, zr.grad)


def test_ce_no_grad_forms_no_gradient(monkeypatch):
    calls = []
    real = cpu._to_grad_
    monkeypatch.setattr(cpu, "_to_grad_", lambda *a, **k: calls.append(1) or real(*a, **k))
    z, t = randn(5, 37).requires_grad_(), make_targets((5,), 37)
    with torch.no_grad():
        loss = cpu.masked_cross_entropy(z, t)
    assert calls == [] and not loss.requires_grad
    assert_close(loss, ref.masked_cross_entropy(z, t).detach())
    cpu.masked_cross_entropy(z.detach(), t)  # no input needs a gradient
    assert calls == []


def test_ce_rejects_bad_arguments():
    z, t = randn(2, 5), torch.tensor([0, 1])
    for kwargs in ({"reduction": "avg"}, {"label_smoothing": 1.5}, {"z_loss": -1.0}):
        with pytest.raises(ValueError):
            cpu.masked_cross_entropy(z, t, **kwargs)
        with pytest.raises(ValueError):
            cpu.linear_cross_entropy(z, randn(7, 5), t, **kwargs)
    with pytest.raises(ValueError):
        cpu.masked_cross_entropy(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        cpu.linear_cross_entropy(z, randn(7, 5), t, chunk_size=0)


# ------------------------------------------------------------------------------ linear_cross_entropy

LCE_SHAPES = [((13,), 16, 37, 4), ((2, 3), 32, 300, None), ((2, 5), 24, 123, 3), ((17,), 8, 1000, 16)]


def lce_case(lead, hidden, vocab, chunk, dtype, reduction, ls=0.0, zl=0.0, h_scale=1.0):
    h = randn(*lead, hidden, dtype=dtype, scale=h_scale)
    w = randn(vocab, hidden, dtype=dtype, scale=hidden ** -0.5 * 2, seed=1)
    t = make_targets(lead, vocab)
    return run_both(cpu.linear_cross_entropy, ref.linear_cross_entropy, [h, w, t], new_kw={"chunk_size": chunk},
                    reduction=reduction, label_smoothing=ls, z_loss=zl)


@pytest.mark.parametrize("lead,hidden,vocab,chunk", LCE_SHAPES)
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ls,zl", [(0.0, 0.0), (0.1, 1e-3)])
def test_lce_matches_reference(lead, hidden, vocab, chunk, dtype, reduction, ls, zl):
    (loss, (dh, dw)), (loss_ref, (dh_ref, dw_ref)) = lce_case(lead, hidden, vocab, chunk, dtype, reduction, ls, zl)
    assert loss.dtype == F32 and dh.dtype == dtype and dw.dtype == dtype
    assert_close(loss, loss_ref, F32 if dtype == F32 else BF16)
    assert_close(dh, dh_ref, dtype)
    assert_close(dw, dw_ref, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lce_large_logits(reduction):
    (loss, grads), (loss_ref, grads_ref) = lce_case((3, 4), 16, 37, 5, F32, reduction, 0.1, 1e-3, h_scale=300.0)
    assert loss.isfinite().all()
    assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n_valid", [0, 1])
def test_lce_all_or_all_but_one_ignored(reduction, n_valid):
    h, w = randn(2, 3, 16), randn(37, 16, seed=1)
    t = torch.full((2, 3), -100)
    t[1, 2] = 7 if n_valid else -100
    (loss, (dh, dw)), (loss_ref, (dh_ref, dw_ref)) = run_both(
        cpu.linear_cross_entropy, ref.linear_cross_entropy, [h, w, t], new_kw={"chunk_size": 4},
        reduction=reduction, label_smoothing=0.1)
    if n_valid == 0:
        assert torch.equal(loss, torch.zeros_like(loss_ref))
        assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))
    assert_close(loss, loss_ref)
    assert_close(dh, dh_ref)
    assert_close(dw, dw_ref)


def test_lce_nan_hidden_propagates_like_reference():
    h, w = randn(5, 16), randn(37, 16, seed=1)
    h[2, 3] = float("nan")
    t = torch.tensor([1, 2, 3, -100, 4])
    (loss, grads), (loss_ref, grads_ref) = run_both(
        cpu.linear_cross_entropy, ref.linear_cross_entropy, [h, w, t], new_kw={"chunk_size": 2}, reduction="none")
    assert_close(loss, loss_ref, equal_nan=True)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, equal_nan=True)


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_lce_partial_requires_grad(which):
    h, w = randn(7, 16), randn(37, 16, seed=1)
    t = make_targets((7,), 37)
    h.requires_grad_(which == "hidden")
    w.requires_grad_(which == "weight")
    leaf = h if which == "hidden" else w
    (g,) = torch.autograd.grad(cpu.linear_cross_entropy(h, w, t, chunk_size=3), leaf)
    (g_ref,) = torch.autograd.grad(ref.linear_cross_entropy(h, w, t), leaf)
    assert_close(g, g_ref)


def test_lce_chunks_never_hold_full_logits_and_no_grad_skips_backward(monkeypatch):
    seen = []
    real = cpu._softmax_rows
    monkeypatch.setattr(cpu, "_softmax_rows", lambda z, *a: seen.append(z.shape[0]) or real(z, *a))
    grads = []
    real_grad = cpu._to_grad_
    monkeypatch.setattr(cpu, "_to_grad_", lambda *a, **k: grads.append(1) or real_grad(*a, **k))
    h, w = randn(11, 16, seed=2).requires_grad_(), randn(37, 16, seed=1).requires_grad_()
    t = make_targets((11,), 37)
    cpu.linear_cross_entropy(h, w, t, chunk_size=4).backward()
    assert seen == [4, 4, 3] and len(grads) == 3
    seen.clear(), grads.clear()
    with torch.no_grad():
        loss = cpu.linear_cross_entropy(h, w, t, chunk_size=4)
    assert seen == [4, 4, 3] and grads == []
    assert_close(loss, ref.linear_cross_entropy(h, w, t).detach())


def test_lce_backward_twice_and_tied_weight():
    h0, w0, t = randn(9, 8, seed=3), randn(41, 8, seed=4), make_targets((9,), 41)
    ids = torch.randint(0, 41, (9,), generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (functools.partial(cpu.linear_cross_entropy, chunk_size=4), ref.linear_cross_entropy):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        # the weight is also an embedding table (tied), so autograd adds two gradients into it
        loss = fn(h + torch.nn.functional.embedding(ids, w), w, t)
        first = torch.autograd.grad(2.0 * loss, [h, w], retain_graph=True)
        second = torch.autograd.grad(loss, [h, w])
        grads.append((first, second))
    (f, s), (f_ref, s_ref) = grads
    for a, b in zip(f + s, f_ref + s_ref):
        assert_close(a, b)


# ------------------------------------------------------------------------------------------ dispatch


def test_auto_on_cpu_runs_kernels_cpu_and_torch_the_reference(monkeypatch):
    seen = []
    for name in ("masked_cross_entropy", "linear_cross_entropy"):
        for mod, tag in ((cpu, "cpu"), (ref, "ref")):
            real = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, _r=real, _t=f"{tag}.{name}", **k: seen.append(_t) or _r(*a, **k))
    z, t, h, w = randn(4, 37), make_targets((4,), 37), randn(4, 8), randn(37, 8, seed=1)
    for backend in ("auto", "torch"):
        kernels.masked_cross_entropy(z, t, backend=backend)
        kernels.linear_cross_entropy(h, w, t, backend=backend)
    # the reference's linear CE calls its own masked CE
    assert seen == ["cpu.masked_cross_entropy", "cpu.linear_cross_entropy", "ref.masked_cross_entropy",
                    "ref.linear_cross_entropy", "ref.masked_cross_entropy"]


def test_linear_ce_workspace_is_reused_across_calls():
    """No chunk buffer is allocated (and page-faulted in) per call: the second call uses the first one's."""
    h, w, t = randn(64, 8).requires_grad_(), randn(500, 8, seed=1).requires_grad_(), make_targets((64,), 500)
    cpu.linear_cross_entropy(h, w, t, chunk_size=16).backward()
    ptr = cpu._local.buf.data_ptr()
    cpu.linear_cross_entropy(h, w, t, chunk_size=16).backward()
    assert cpu._local.buf.data_ptr() == ptr


# ------------------------------------------------------------------------------- system time (issue #17)

_FAULTS_PER_STEP = """
import resource, torch
from metalm.cli.train import keep_freed_memory
if {keep}:
    keep_freed_memory()
from metalm.config import load_config
from metalm.train.module import PretrainModule
torch.set_num_threads(1)
cfg = load_config({config!r}, ["meta.enabled=false", "train.device=cpu"])
assert cfg.model.fused_linear_ce and cfg.model.vocab_size == 50304
torch.manual_seed(0)
module = PretrainModule.from_config(cfg)
opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
batch = torch.randint(0, 50304, (8, 129))
def step():
    module.ar_loss(batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[2])  # the median step: a rare spike (the kernel reclaiming cold pages) is not ours
"""


def test_keep_freed_memory_sets_glibc_thresholds_unless_the_user_did(monkeypatch):
    import ctypes
    import sys

    from metalm.cli.train import keep_freed_memory

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(sys, "platform", "linux")
    for k in [k for k in __import__("os").environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(k)
    keep_freed_memory()
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD 32 MB, M_TRIM_THRESHOLD 1 GB
    calls.clear()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    keep_freed_memory()
    assert calls == []


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's allocator")
def test_cpu_tiny_ar_step_page_faults_nothing_under_the_launcher_allocator_setting():
    """The shipped cpu-tiny AR step (fused CPU linear CE) with the entry point's keep_freed_memory():
    after warm-up the median step faults in no new pages. (Without the setting it depends on the heap's
    layout: in some processes glibc trims and re-faults thousands of pages every step, in others not.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["OMP_NUM_THREADS"] = "1"
    code = _FAULTS_PER_STEP.format(keep=True, config=str(repo / "configs" / "cpu-tiny.yaml"))
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 50  # 4 KB pages: 0.2 MB in the median step
