"""How close a kernel's values and gradients must be to its reference (kernels.reference): one definition for
the test suite (tests/test_kernels*.py) and the GPU check (benchmarks/gpu_check.py).

Per dtype an (rtol, atol) pair; atol is relative to the largest finite reference magnitude (at least 1), so a
gradient of size 1e-3 and a loss of size 5 are both held to a few ulps of their own dtype.
"""
from __future__ import annotations

import torch

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def tolerances(expected: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing against `expected` at `dtype`'s tolerance, atol scaled as described above."""
    finite = expected.float()
    finite = finite[finite.isfinite()]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    rtol, atol = TOL[dtype]
    return rtol, atol * scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32,
                 equal_nan: bool = False) -> None:
    """AssertionError unless `actual` has `expected`'s dtype and shape and its values are within tolerance."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    rtol, atol = tolerances(expected, dtype)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, equal_nan=equal_nan)


def closeness(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> dict:
    """The comparison assert_close makes, as numbers: the largest |actual - expected| and the largest ratio of
    an element's error to what the tolerance allows there (<= 1: within tolerance); `ok` says whether
    assert_close would pass."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return {"ok": False, "problem": f"dtype/shape {actual.dtype}/{tuple(actual.shape)} vs reference "
                                        f"{expected.dtype}/{tuple(expected.shape)}"}
    rtol, atol = tolerances(expected, dtype)
    a, e = actual.float(), expected.float()
    err = (a - e).abs()
    allowed = atol + rtol * e.abs()
    # Non-finite entries must agree exactly (same inf, both NaN is not allowed: equal_nan=False).
    both_finite = a.isfinite() & e.isfinite()
    same_nonfinite = (~both_finite) & (a == e)
    mismatched = int((~both_finite & ~same_nonfinite).sum().item())
    err = torch.where(both_finite, err, torch.zeros_like(err))
    ratio = (err / allowed).max().item() if err.numel() else 0.0
    return {"ok": mismatched == 0 and ratio <= 1.0, "max_abs_err": err.max().item() if err.numel() else 0.0,
            "max_err_over_tol": ratio, "nonfinite_mismatches": mismatched, "rtol": rtol, "atol": atol}


__all__ = ["TOL", "assert_close", "closeness", "tolerances"]
