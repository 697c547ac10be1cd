"""Set-level realism: the Fréchet distance between two sets of image features (the math behind FID).

Each set is summarised by the mean ``mu`` and covariance ``C`` of its feature vectors, i.e. by the Gaussian with
those moments; the squared 2-Wasserstein (Fréchet) distance between two Gaussians is

    d² = |mu_a − mu_b|² + Tr(C_a + C_b − 2 (C_a^½ C_b C_a^½)^½)

(Dowson & Landau 1982). FID (Heusel et al. 2017) reports this d² on Inception features; here the features are
whatever the caller passes (the report uses the CXR classifier's 1024-dimensional DenseNet features).

Numerics: everything is float64, and the cross term ``Tr((C_a^½ C_b C_a^½)^½)`` is computed one of two exact ways:

- from the samples (when ``n_a · n_b ≤ dim²``, the usual case for a batch): with ``A``, ``B`` the centred vectors
  divided by √(n − 1) (so ``C = Aᵀ A``), ``C_a^½ C_b C_a^½ = (B C_a^½)ᵀ (B C_a^½)``, whose square root's trace is the
  sum of the singular values of ``B C_a^½``, i.e. of ``A Bᵀ`` (``B C_a Bᵀ = (A Bᵀ)ᵀ (A Bᵀ)``): the nuclear norm of
  the small ``[n_a, n_b]`` matrix ``A Bᵀ``. No dim × dim matrix, no square root of a rounding-level eigenvalue,
  and singular covariances (n ≤ dim) need no special care;
- from the moments (:func:`frechet_from_moments`, many vectors): ``C_a^½`` by the eigendecomposition of the
  symmetric ``C_a`` (negative eigenvalues, which are rounding, clamped to 0), then the eigenvalues of the symmetric
  positive semi-definite ``C_a^½ C_b C_a^½``, clamped and square-rooted. This avoids the general, non-symmetric
  ``sqrtm(C_a C_b)`` of common FID code, which can return complex values and needs a diagonal offset.

Sample size: a plug-in estimate on n vectors is biased upward (two samples of one distribution score > 0, the
excess shrinking roughly as 1/n), and with n ≤ d the covariances have rank ≤ n − 1. :attr:`Realism.caveat` says
so, with the n the number rests on; it is meant to be printed next to the number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CXRInputError

SOURCE = "set-level realism"


@dataclass(frozen=True)
class Realism:
    """A Fréchet distance with what it rests on.

    Attributes:
        distance: d² (FID convention: the squared distance), in squared feature units.
        n_reference, n_compared: vectors in each set.
        dim: feature dimension.
        caveat: the sample-size caveat, one paragraph of plain text.
    """

    distance: float
    n_reference: int
    n_compared: int
    dim: int
    caveat: str


def _check(features: torch.Tensor, name: str) -> torch.Tensor:
    if features.ndim != 2 or features.shape[0] < 2 or features.shape[1] < 1:
        raise CXRInputError(f"{name} features are shaped {tuple(features.shape)}; need [n ≥ 2, dim].",
                            node=SOURCE, input_name=name, fix="Pass at least two feature vectors per set.")
    x = features.to(torch.float64)
    if not torch.isfinite(x).all():
        raise CXRInputError(f"{name} features hold NaN or infinite values.", node=SOURCE, input_name=name,
                            fix="Recompute the features; a classifier run on a blank or broken image can give NaN.")
    return x


def _scaled_centred(x: torch.Tensor) -> torch.Tensor:
    """``A`` with ``Aᵀ A`` = the (n − 1)-normalised sample covariance of the rows of ``x``."""
    return (x - x.mean(0)) / (x.shape[0] - 1) ** 0.5


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The square root of a symmetric positive semi-definite matrix (eigenvalues below 0 are rounding: 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_from_moments(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor,
                         cov_b: torch.Tensor) -> float:
    """d² between the Gaussians N(mu_a, cov_a) and N(mu_b, cov_b); see the module doc for the numerics."""
    mu_a, mu_b, cov_a, cov_b = (t.to(torch.float64) for t in (mu_a, mu_b, cov_a, cov_b))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(d2.clamp_min(0))  # below 0 only by rounding: the true d² is ≥ 0


def caveat(n_reference: int, n_compared: int, dim: int) -> str:
    n = min(n_reference, n_compared)
    text = (f"Rests on {n_reference} reference and {n_compared} compared feature vectors of dimension {dim}. "
            "A Fréchet distance (FID) estimated from few samples is biased upward: two samples of the same "
            "distribution score above 0, by an amount that shrinks roughly as 1/n, so compare only numbers "
            "computed with the same features and the same n, never against published FIDs (usually 10,000+ images).")
    if n <= dim:
        text += (f" With n = {n} ≤ {dim} dimensions both covariances are singular (rank ≤ n − 1): the number is "
                 "finite but mostly measures the sample size.")
    return text


def frechet_distance(reference: torch.Tensor, compared: torch.Tensor) -> Realism:
    """d² between two sets of feature vectors (``[n, dim]`` each, any n ≥ 2; the dims must agree).

    Raises:
        CXRInputError: fewer than 2 vectors in a set, mismatched dims, or non-finite values.
    """
    if reference.ndim == 2 and compared.ndim == 2 and reference.shape[1] != compared.shape[1]:
        raise CXRInputError(f"feature dimensions differ: {reference.shape[1]} (reference) vs {compared.shape[1]}.",
                            node=SOURCE, input_name="compared", fix="Use features of one extractor for both sets.")
    a, b = _check(reference, "reference"), _check(compared, "compared")
    (n_a, dim), n_b = a.shape, b.shape[0]
    sa, sb = _scaled_centred(a), _scaled_centred(b)
    if n_a * n_b <= dim * dim:  # the samples' route (module doc): an [n_a, n_b] SVD instead of dim × dim work
        cross = torch.linalg.svdvals(sa @ sb.T).sum()
        d2 = (a.mean(0) - b.mean(0)).square().sum() + sa.square().sum() + sb.square().sum() - 2 * cross
        distance = float(d2.clamp_min(0))  # below 0 only by rounding
    else:
        distance = frechet_from_moments(a.mean(0), sa.T @ sa, b.mean(0), sb.T @ sb)
    return Realism(distance, n_a, n_b, dim, caveat(n_a, n_b, dim))
