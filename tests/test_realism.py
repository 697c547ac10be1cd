"""imaging/realism.py: the Fréchet distance between feature sets against closed forms, and its sample-size caveat."""

from __future__ import annotations

import math

import pytest
import torch

from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging.realism import frechet_distance, frechet_from_moments

EPS = torch.finfo(torch.float64).eps


def with_moments(n: int, mu: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n vectors whose sample mean and (n − 1)-normalised covariance are exactly ``mu`` and ``cov`` (up to rounding):
    random vectors, centred and whitened to identity sample covariance, then coloured by the Cholesky factor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, mu.numel(), generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    white = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / (n - 1))).T
    return white @ torch.linalg.cholesky(cov).T + mu


def trace_sqrt_2x2(m: torch.Tensor) -> float:
    """Tr √M for a 2×2 positive semi-definite M: the eigenvalues' roots s1, s2 satisfy (s1 + s2)² = Tr M + 2 √det M."""
    return math.sqrt(float(torch.trace(m)) + 2 * math.sqrt(max(float(torch.linalg.det(m)), 0.0)))


def test_identical_sets_are_at_distance_zero():
    feats = torch.randn(40, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    result = frechet_distance(feats, feats.clone())
    # n < dim: the samples' route, d² = 2‖A‖²_F − 2‖A Aᵀ‖_* with A Aᵀ positive semi-definite (nuclear norm = trace).
    # Forming A Aᵀ errs by ≤ dim·eps·‖A‖²_F, and each of its n singular values by ≤ n·eps·σ_max ≤ n·eps·‖A‖²_F
    # (backward-stable SVD): in all ≤ 2·n·(n + dim)·eps·‖A‖²_F, twice for the factor 2.
    a = (feats - feats.mean(0)) / (40 - 1) ** 0.5
    tolerance = 4 * 40 * (40 + 64) * EPS * float(a.square().sum())
    assert 0.0 <= result.distance <= tolerance
    # n > dim: the moments' route, where eigh's error on a near-zero eigenvalue of C² grows under the square root to
    # √(dim·eps)·‖C‖, for each of dim eigenvalues.
    many = torch.randn(300, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    norm = float(torch.linalg.matrix_norm(torch.cov(many.T), ord=2))
    assert 0.0 <= frechet_distance(many, many.clone()).distance <= 2 * 8 * math.sqrt(8 * EPS) * norm


def test_the_two_routes_agree():
    """The samples' route (n_a·n_b ≤ dim²) against the moments' route on the same sets' moments."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(12, 20, generator=g, dtype=torch.float64)
    b = torch.randn(15, 20, generator=g, dtype=torch.float64) * 1.5 + 0.3
    samples = frechet_distance(a, b).distance  # 12·15 ≤ 400
    moments = frechet_from_moments(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    # The moments' route square-roots rank-deficient spectra (rank ≤ 11 of 20): its error is √(dim·eps)-sized per
    # eigenvalue, ~1e-7 relative to ‖C‖ ~ 1 here; the samples' route is exact to rounding.
    assert samples == pytest.approx(moments, abs=20 * math.sqrt(20 * EPS) * 4)


def test_two_gaussians_match_the_closed_form():
    mu_a, mu_b = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 1.0], dtype=torch.float64)
    cov_a = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    cov_b = torch.tensor([[0.5, -0.3], [-0.3, 3.0]], dtype=torch.float64)  # does not commute with cov_a
    root_a = torch.linalg.cholesky(cov_a)  # any factor works for the trace: C_a^½ C_b C_a^½ ~ L^T C_b L (similar)
    expected = (float((mu_a - mu_b).square().sum()) + float(torch.trace(cov_a) + torch.trace(cov_b))
                - 2 * trace_sqrt_2x2(root_a.T @ cov_b @ root_a))
    # Moments given directly, and sets built to have exactly these moments: float64 rounding only, on O(1) values.
    assert frechet_from_moments(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, abs=1e-12)
    sets = frechet_distance(with_moments(50, mu_a, cov_a, 1), with_moments(80, mu_b, cov_b, 2))
    assert sets.distance == pytest.approx(expected, abs=1e-9)
    assert (sets.n_reference, sets.n_compared, sets.dim) == (50, 80, 2) and "50 reference and 80" in sets.caveat
    assert "singular" not in sets.caveat  # n > dim


def test_diagonal_covariances_give_the_sum_of_squared_root_differences():
    # Commuting (diagonal) covariances: Tr(...) = Σ (σ_a − σ_b)², the classic closed form.
    var_a, var_b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    mu = torch.zeros(3)
    expected = float(((var_a.sqrt() - var_b.sqrt()) ** 2).sum())
    assert frechet_from_moments(mu, torch.diag(var_a), mu, torch.diag(var_b)) == pytest.approx(expected, abs=1e-12)


def test_row_order_does_not_matter():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(30, 16, generator=g), torch.randn(25, 16, generator=g) + 0.5
    base = frechet_distance(a, b).distance
    shuffled = frechet_distance(a[torch.randperm(30, generator=g)], b[torch.randperm(25, generator=g)]).distance
    # Summation order changes rounding only: float64 sums of O(1) values over 30 rows.
    assert shuffled == pytest.approx(base, rel=1e-10, abs=1e-10)


def test_fewer_vectors_than_dimensions_is_finite_and_says_so():
    g = torch.Generator().manual_seed(4)
    result = frechet_distance(torch.randn(6, 1024, generator=g), torch.randn(9, 1024, generator=g) + 0.1)
    assert math.isfinite(result.distance) and result.distance > 0
    assert "singular" in result.caveat and "n = 6 ≤ 1024" in result.caveat and "biased upward" in result.caveat


def test_bad_sets_are_refused():
    with pytest.raises(CXRInputError, match="need"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(CXRInputError, match="dimensions differ"):
        frechet_distance(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(CXRInputError, match="NaN"):
        frechet_distance(torch.full((3, 4), float("nan")), torch.randn(5, 4))
