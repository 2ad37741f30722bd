"""Triton kernels against their PyTorch references: values and every gradient, odd shapes, bf16/fp16,
ignored rows, non-finite inputs; plus the backend dispatch and the `kernels` / transformers name clash.

On a CPU-only machine the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before any
Triton module is imported); shapes stay tiny because the interpreter runs each program in numpy.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernel_cases
import kernels
from kernel_cases import BF16, F16, F32, run_both
from kernels import reference as ref
from kernels.tolerance import assert_close

pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
REPO = Path(__file__).resolve().parents[1]

rms_mod = importlib.import_module("kernels.rmsnorm")
ce_mod = importlib.import_module("kernels.masked_ce")
lce_mod = importlib.import_module("kernels.linear_ce")

# the inputs on the kernels' device
randn = functools.partial(kernel_cases.randn, device=DEVICE)
make_targets = functools.partial(kernel_cases.make_targets, device=DEVICE)


# ----------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 96), (2, 3, 5), (4, 384)])
@pytest.mark.parametrize("dtype,w_dtype", [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32)])
@pytest.mark.parametrize("launch", [{}, {"block_m": 2, "num_programs": 2}])
def test_rmsnorm_matches_reference(shape, dtype, w_dtype, launch):
    x = randn(*shape, dtype=dtype, scale=2.0)
    w = 1.0 + randn(shape[-1], dtype=w_dtype, scale=0.2, seed=1)
    (y, (dx, dw)), (y_ref, (dx_ref, dw_ref)) = run_both(rms_mod.rmsnorm, ref.rmsnorm, [x, w], new_kw=launch)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == w_dtype
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype)
    assert_close(dw, dw_ref, w_dtype if w_dtype == dtype else F32)


def test_rmsnorm_noncontiguous_and_large_hidden():
    x = randn(1536, 6, scale=3.0).t()  # (6, 1536), stride 6 along the hidden dim
    w = randn(1536, seed=1)
    (y, grads), (y_ref, grads_ref) = run_both(rms_mod.rmsnorm, ref.rmsnorm, [x, w], eps=1e-5)
    assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref)


def test_rmsnorm_zero_rows_and_bad_weight():
    x = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    y = rms_mod.rmsnorm(x, w)
    y.sum().backward()
    assert y.shape == (0, 8) and w.grad.abs().sum() == 0
    with pytest.raises(ValueError):
        rms_mod.rmsnorm(torch.ones(2, 8, device=DEVICE), torch.ones(7, device=DEVICE))


# ---------------------------------------------------------------------------------- cross-entropy

CE_SHAPES = [((5,), 37, 16), ((2, 3), 37, None), ((4,), 300, 64), ((3,), 1000, 256)]


def ce_case(lead, vocab, block_v, dtype, reduction, ls=0.0, zl=0.0, ignore_index=-100, scale=3.0):
    logits = randn(*lead, vocab, dtype=dtype, scale=scale)
    targets = make_targets(lead, vocab, ignore_index)
    return run_both(ce_mod.masked_cross_entropy, ref.masked_cross_entropy, [logits, targets],
                    new_kw={"block_v": block_v}, ignore_index=ignore_index, reduction=reduction,
                    label_smoothing=ls, z_loss=zl)


@pytest.mark.parametrize("lead,vocab,block_v", CE_SHAPES)
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_ce_matches_reference(lead, vocab, block_v, dtype, reduction):
    (loss, (dz,)), (loss_ref, (dz_ref,)) = ce_case(lead, vocab, block_v, dtype, reduction)
    assert loss.dtype == F32 and dz.dtype == dtype
    assert_close(loss, loss_ref, F32 if dtype == F32 else BF16)
    assert_close(dz, dz_ref, dtype)


@pytest.mark.parametrize("ls,zl", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_masked_ce_smoothing_and_z_loss(ls, zl, reduction, dtype):
    (loss, (dz,)), (loss_ref, (dz_ref,)) = ce_case((2, 5), 123, 32, dtype, reduction, ls, zl)
    assert_close(loss, loss_ref, F32 if dtype == F32 else BF16)
    assert_close(dz, dz_ref, dtype)


def test_masked_ce_ignore_index_that_is_a_class():
    # ignore_index=5 is also a real vocabulary id: rows targeting 5 must be dropped, not scored.
    (loss, (dz,)), (loss_ref, (dz_ref,)) = ce_case((7,), 11, 16, F32, "mean", 0.1, 1e-3, ignore_index=5)
    assert_close(loss, loss_ref)
    assert_close(dz, dz_ref)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_ce_all_ignored_is_zero_not_nan(reduction):
    logits = randn(2, 3, 37)
    targets = torch.full((2, 3), -100, device=DEVICE)
    (loss, (dz,)), (loss_ref, (dz_ref,)) = run_both(ce_mod.masked_cross_entropy, ref.masked_cross_entropy,
                                                    [logits, targets], reduction=reduction, label_smoothing=0.1,
                                                    z_loss=1e-3)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(dz, torch.zeros_like(dz))
    assert_close(loss, loss_ref)
    assert_close(dz, dz_ref)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_masked_ce_large_logits_do_not_overflow(dtype):
    (loss, (dz,)), (loss_ref, (dz_ref,)) = ce_case((6,), 300, 64, dtype, "none", 0.1, 1e-4, scale=1e4)
    assert loss.isfinite().all() and dz.isfinite().all()
    assert_close(loss, loss_ref, F32 if dtype == F32 else BF16)
    assert_close(dz, dz_ref, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the discarded branch of a tl.where
def test_masked_ce_minus_inf_columns():
    # Masked-out vocabulary entries (-inf) are legal and must stay finite, including a whole -inf block.
    logits = randn(4, 70)
    logits[:, 16:40] = float("-inf")
    logits[1, ::3] = float("-inf")
    logits[2, :16] = float("-inf")
    logits[2, 16:] -= 1e4  # after an all -inf block: rescaling d=0 by exp(1e4) would give 0 * inf = NaN
    targets = torch.tensor([3, 1, 45, -100], device=DEVICE)
    (loss, (dz,)), (loss_ref, (dz_ref,)) = run_both(ce_mod.masked_cross_entropy, ref.masked_cross_entropy,
                                                    [logits, targets], new_kw={"block_v": 16},
                                                    reduction="none", z_loss=1e-3)
    assert loss.isfinite().all() and dz.isfinite().all()
    assert_close(loss, loss_ref)
    assert_close(dz, dz_ref)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter, on inf - inf
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("ls,zl", [(0.0, 0.0), (0.1, 1e-3)])
def test_masked_ce_non_finite_propagate_like_reference(reduction, ls, zl):
    logits = randn(6, 37)
    targets = torch.tensor([1, 2, 3, -100, 5, 6], device=DEVICE)
    logits[0, 7] = float("nan")          # NaN in a valid row: that row's loss and gradient are NaN
    logits[3, 0] = float("nan")          # NaN in an ignored row: must not leak anywhere
    logits[1, 30] = float("inf")         # +inf: lse = inf, like torch.logsumexp
    logits[2, :] = float("-inf")         # all -inf: lse = -inf, loss NaN
    (loss, (dz,)), (loss_ref, (dz_ref,)) = run_both(ce_mod.masked_cross_entropy, ref.masked_cross_entropy,
                                                    [logits, targets], new_kw={"block_v": 16},
                                                    reduction=reduction, label_smoothing=ls, z_loss=zl)
    assert_close(loss, loss_ref, equal_nan=True)
    assert_close(dz, dz_ref, equal_nan=True)
    assert torch.equal(dz[3], torch.zeros_like(dz[3]))
    assert dz[4:].isfinite().all()


def test_masked_ce_out_of_range_target_is_nan_not_garbage():
    logits = randn(3, 37)
    loss = ce_mod.masked_cross_entropy(logits, torch.tensor([1, 37, -7], device=DEVICE), reduction="none")
    assert loss[0].isfinite() and loss[1:].isnan().all()


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 70), block_v=st.sampled_from([16, 32, None]),
       ls=st.sampled_from([0.0, 0.05]), zl=st.sampled_from([0.0, 1e-2]),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**16))
def test_masked_ce_property(rows, vocab, block_v, ls, zl, reduction, seed):
    logits = randn(rows, vocab, scale=5.0, seed=seed)
    targets = make_targets((rows,), vocab, ignore_frac=0.4, seed=seed)
    (loss, (dz,)), (loss_ref, (dz_ref,)) = run_both(
        ce_mod.masked_cross_entropy, ref.masked_cross_entropy, [logits, targets], seed,
        new_kw={"block_v": block_v}, reduction=reduction, label_smoothing=ls, z_loss=zl)
    assert_close(loss, loss_ref)
    assert_close(dz, dz_ref)


def test_masked_ce_rejects_bad_arguments():
    z, t = randn(2, 5), torch.tensor([0, 1], device=DEVICE)
    for kwargs in ({"reduction": "avg"}, {"label_smoothing": 1.5}, {"z_loss": -1.0}):
        with pytest.raises(ValueError):
            ce_mod.masked_cross_entropy(z, t, **kwargs)
    with pytest.raises(ValueError):
        ce_mod.masked_cross_entropy(z, torch.tensor([0, 1, 2], device=DEVICE))


# ----------------------------------------------------------------------------- linear + CE (fused)

LCE_SHAPES = [((13,), 16, 37, 4), ((2, 3), 32, 300, None), ((2, 5), 24, 123, 3)]


def lce_case(lead, hidden, vocab, chunk, dtype, reduction, ls=0.0, zl=0.0, h_scale=1.0):
    h = randn(*lead, hidden, dtype=dtype, scale=h_scale)
    w = randn(vocab, hidden, dtype=dtype, scale=hidden ** -0.5 * 2, seed=1)
    t = make_targets(lead, vocab)
    return run_both(lce_mod.linear_cross_entropy, ref.linear_cross_entropy, [h, w, t],
                    new_kw={"chunk_size": chunk, "block_v": 32}, reduction=reduction, label_smoothing=ls,
                    z_loss=zl)


@pytest.mark.parametrize("lead,hidden,vocab,chunk", LCE_SHAPES)
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_matches_reference(lead, hidden, vocab, chunk, dtype, reduction):
    (loss, (dh, dw)), (loss_ref, (dh_ref, dw_ref)) = lce_case(lead, hidden, vocab, chunk, dtype, reduction)
    assert loss.dtype == F32 and dh.dtype == dtype and dw.dtype == dtype
    assert_close(loss, loss_ref, F32 if dtype == F32 else BF16)
    assert_close(dh, dh_ref, dtype)
    assert_close(dw, dw_ref, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_smoothing_z_loss_large_logits(reduction):
    # h_scale=300 puts logits in the thousands: the online lse must stay finite.
    (loss, grads), (loss_ref, grads_ref) = lce_case((3, 4), 16, 37, 5, F32, reduction, 0.1, 1e-3, h_scale=300.0)
    assert loss.isfinite().all()
    assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n_valid", [0, 1])
def test_linear_ce_all_or_all_but_one_ignored(reduction, n_valid):
    h, w = randn(2, 3, 16), randn(37, 16, seed=1)
    t = torch.full((2, 3), -100, device=DEVICE)
    t[1, 2] = 7 if n_valid else -100
    (loss, (dh, dw)), (loss_ref, (dh_ref, dw_ref)) = run_both(
        lce_mod.linear_cross_entropy, ref.linear_cross_entropy, [h, w, t], new_kw={"chunk_size": 4},
        reduction=reduction)
    if n_valid == 0:
        assert torch.equal(loss, torch.zeros_like(loss_ref))
        assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))
    assert_close(loss, loss_ref)
    assert_close(dh, dh_ref)
    assert_close(dw, dw_ref)


def test_linear_ce_nan_hidden_propagates_like_reference():
    h, w = randn(5, 16), randn(37, 16, seed=1)
    h[2, 3] = float("nan")
    t = torch.tensor([1, 2, 3, -100, 4], device=DEVICE)
    (loss, grads), (loss_ref, grads_ref) = run_both(
        lce_mod.linear_cross_entropy, ref.linear_cross_entropy, [h, w, t], new_kw={"chunk_size": 2},
        reduction="none")
    assert_close(loss, loss_ref, equal_nan=True)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, equal_nan=True)


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_linear_ce_partial_requires_grad(which):
    h, w = randn(7, 16), randn(37, 16, seed=1)
    t = make_targets((7,), 37)
    h.requires_grad_(which == "hidden")
    w.requires_grad_(which == "weight")
    leaf = h if which == "hidden" else w
    loss = lce_mod.linear_cross_entropy(h, w, t, chunk_size=3)
    (g,) = torch.autograd.grad(loss, leaf)
    (g_ref,) = torch.autograd.grad(ref.linear_cross_entropy(h, w, t), leaf)
    assert_close(g, g_ref)


def test_linear_ce_chunks_never_hold_full_logits(monkeypatch):
    """Every CE launch sees at most chunk_size rows, and under no_grad no gradient is computed."""
    calls = []
    real = lce_mod.ce_forward

    def spy(logits, *args, **kwargs):
        calls.append((logits.shape[0], kwargs.get("grad") is not None))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(lce_mod, "ce_forward", spy)
    h, w = randn(11, 16, seed=2).requires_grad_(), randn(37, 16, seed=1).requires_grad_()
    t = make_targets((11,), 37)
    lce_mod.linear_cross_entropy(h, w, t, chunk_size=4).backward()
    assert [c[0] for c in calls] == [4, 4, 3] and all(c[1] for c in calls)
    calls.clear()
    with torch.no_grad():
        loss = lce_mod.linear_cross_entropy(h, w, t, chunk_size=4)
    assert [c[1] for c in calls] == [False, False, False]
    assert_close(loss, ref.linear_cross_entropy(h, w, t).detach())


# ----------------------------------------------------------------------------------------- dispatch


def test_dispatch_triton_backend_calls_kernels(monkeypatch):
    seen = []
    for mod, name in ((rms_mod, "rmsnorm"), (ce_mod, "masked_cross_entropy"), (lce_mod, "linear_cross_entropy")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name: seen.append(_name) or _real(*a))
    x, w = randn(3, 8), randn(8, seed=1)
    assert_close(kernels.rmsnorm(x, w, backend="triton"), ref.rmsnorm(x, w))
    z, t = randn(4, 37), make_targets((4,), 37)
    assert_close(kernels.masked_cross_entropy(z, t, backend="triton"), ref.masked_cross_entropy(z, t))
    wv = randn(37, 8, seed=2)
    h = randn(4, 8, seed=3)
    assert_close(kernels.linear_cross_entropy(h, wv, t, backend="triton"), ref.linear_cross_entropy(h, wv, t))
    assert seen == ["rmsnorm", "masked_cross_entropy", "linear_cross_entropy"]


def test_dispatch_rejects_unknown_backend():
    x, w = randn(3, 8), randn(8)
    z, t = randn(3, 8), torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError):
        kernels.rmsnorm(x, w, backend="cuda")
    with pytest.raises(ValueError):
        kernels.masked_cross_entropy(z, t, backend="Triton")
    with pytest.raises(ValueError):
        kernels.linear_cross_entropy(x, randn(8, 8), t, backend="")


def _run_python(code: str, **env) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_dispatch_torch_and_cpu_auto_never_import_triton():
    # A fresh interpreter, so nothing imported by other tests can hide an import. TRITON_INTERPRET=1
    # is set on purpose: "auto" must still pick plain PyTorch for CPU tensors ("torch": the references,
    # "auto": the references' fast CPU versions in kernels.cpu for the cross-entropies).
    out = _run_python("""
        import sys, torch, kernels
        from kernels import reference as ref
        x, w = torch.randn(3, 8), torch.ones(8)
        z, t, head = torch.randn(3, 11), torch.tensor([1, -100, 2]), torch.randn(11, 8)
        for backend in ("torch", "auto"):
            same = torch.equal if backend == "torch" else torch.allclose
            assert torch.equal(kernels.rmsnorm(x, w, backend=backend), ref.rmsnorm(x, w))
            assert same(kernels.masked_cross_entropy(z, t, backend=backend), ref.masked_cross_entropy(z, t))
            assert same(kernels.linear_cross_entropy(x, head, t, backend=backend), ref.linear_cross_entropy(x, head, t))
        loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith(("triton.", "kernels.")))
        print(loaded)
    """, TRITON_INTERPRET="1")
    assert out.strip() == "['kernels.cpu', 'kernels.reference']"


def test_kernels_package_does_not_confuse_transformers():
    """transformers probes an optional hub package also called `kernels` (is_kernels_available: find_spec,
    then a version in [KERNELS_MIN_VERSION, KERNELS_MAX_VERSION)). Ours must be judged unavailable, so
    transformers never tries `from kernels import get_kernel, ...` on it, and a Llama must run."""
    pytest.importorskip("transformers")
    out = _run_python("""
        import kernels, transformers, torch
        from transformers.utils import import_utils
        assert not import_utils.is_kernels_available(), "transformers mistook metalm's kernels for the hub package"
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
        model = transformers.LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, 100, (2, 7))
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
        assert out.logits.shape == (2, 7, 100) and torch.isfinite(out.loss), out.loss
        print("ok", kernels.__file__)
    """)
    assert out.startswith("ok ") and str(REPO / "kernels") in out


def test_dispatch_names_stay_functions_after_submodule_import():
    # Importing kernels.rmsnorm would normally rebind the package attribute `rmsnorm` to the submodule.
    for name in ("rmsnorm", "masked_cross_entropy", "linear_cross_entropy"):
        assert callable(getattr(kernels, name)) and not isinstance(getattr(kernels, name), type(kernels))
    assert sys.modules["kernels.rmsnorm"] is rms_mod


# Kernel signatures as the launchers bind them (bf16 activations, fp32 statistics, int64 targets).
_CE_TAIL = "grad_stride:i32 SCALE:*fp32 scale_stride:i32 n_cols:i32 ignore_index:i32 label_smoothing:fp32 z_loss:fp32"
_SIGS = {
    "kernels.rmsnorm": [
        ("_rmsnorm_fwd_kernel", "X:*bf16 W:*fp32 Y:*bf16 RSTD:*fp32 x_row_stride:i32 y_row_stride:i32 M:i32 N:i32 "
                                "eps:fp32", {"BLOCK_M": 2, "BLOCK_N": 2048}),
        ("_rmsnorm_bwd_kernel", "X:*bf16 W:*fp32 DY:*bf16 DX:*bf16 RSTD:*fp32 DW_PARTIAL:*fp32 x_row_stride:i32 "
                                "dy_row_stride:i32 dx_row_stride:i32 M:i32 N:i32 rows_per_step:i32",
         {"BLOCK_M": 16, "BLOCK_N": 128}),
    ],
    "kernels.masked_ce": [
        ("_ce_fwd_kernel", "LOGITS:*bf16 logits_stride:i32 TARGETS:*i64 LOSS:*fp32 LSE:*fp32 GRAD:*bf16 "
         + _CE_TAIL, {"HAS_SMOOTHING": True, "HAS_Z_LOSS": True, "COMPUTE_GRAD": True, "BLOCK_V": 4096}),
        ("_ce_fwd_kernel", "LOGITS:*fp32 logits_stride:i32 TARGETS:*i64 LOSS:*fp32 LSE:*fp32 GRAD:*fp32 "
         + _CE_TAIL, {"HAS_SMOOTHING": False, "HAS_Z_LOSS": False, "COMPUTE_GRAD": False, "BLOCK_V": 4096}),
        ("_ce_bwd_kernel", "LOGITS:*bf16 logits_stride:i32 TARGETS:*i64 LSE:*fp32 GRAD:*bf16 " + _CE_TAIL,
         {"HAS_SMOOTHING": True, "HAS_Z_LOSS": False, "BLOCK_V": 4096}),
    ],
}


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter runs kernels as numpy and accepts code the real compiler rejects (loop-carried type
    changes, bad constexpr use). Compile every kernel ahead of time for an H100 (sm_90) down to a cubin,
    which needs Triton's bundled ptxas but no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"""
        import importlib, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        for module, kernels_ in {_SIGS!r}.items():
            mod = importlib.import_module(module)
            for name, sig, consts in kernels_:
                signature = dict(item.split(":") for item in sig.split())
                signature.update({{k: "constexpr" for k in consts}})
                src = ASTSource(fn=getattr(mod, name), signature=signature, constexprs=consts)
                try:
                    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={{"num_warps": 8}})
                except RuntimeError as e:
                    if "ptxas" in str(e) and "not found" in str(e):
                        print("SKIP", e); raise SystemExit(0)
                    raise
                assert compiled.asm["cubin"], name
        print("compiled")
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout)
    assert proc.stdout.strip() == "compiled"
