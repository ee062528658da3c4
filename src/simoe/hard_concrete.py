"""Hard-concrete gates (Louizos, Welling & Kingma, 2018), written as the paper writes them.

A gate z in [0, 1] is a stretched, clamped binary-concrete sample:

    u ~ U(eps, 1 - eps)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)

Stretching to (gamma, zeta) = (-0.1, 1.1) and clamping puts real probability mass on
exactly 0 and exactly 1, so the gates are sparse while log_alpha stays differentiable.

Two regimes decide which gates training and evaluation use (``REGIMES``; :func:`gates` is the one
function every caller goes through):

* ``noise-free`` (SMAT's, with one difference): training and evaluation both use the noise-free
  gate z = clamp(sigmoid(log_alpha / beta)(zeta - gamma) + gamma, 0, 1) (u = 1/2, beta = 2/3).
  SMAT evaluates with beta = 1; we keep beta = 2/3, so the evaluated model *is* the trained one.
  A gate is exactly 0 below log_alpha = beta log(-gamma/zeta) (``NOISE_FREE_ZERO``, -1.599).
* ``stochastic`` (Louizos et al., CoFi): training samples u ~ U(eps, 1 - eps); evaluation uses the
  deterministic gate with beta = 1 (:func:`deterministic`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
EPS = 1e-6
REGIMES = ("noise-free", "stochastic")
# log α at which the noise-free gate (and the stochastic gate's P(z != 0) = 1/2) leaves 0
NOISE_FREE_ZERO = BETA * math.log(-GAMMA / ZETA)

# Gauss-Legendre nodes on [0, 1] for E[z] = integral_0^1 P(z > t) dt. The integrand is smooth,
# so 8 nodes are accurate to ~1e-4 while costing only 8x a gate vector.
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(8)
_T = (_NODES + 1.0) / 2.0
_W = _WEIGHTS / 2.0


def _stretch(s: torch.Tensor) -> torch.Tensor:
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def sample(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reparameterised training sample of the gates, differentiable in ``log_alpha``."""
    u = torch.rand(
        log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype
    ).clamp(EPS, 1.0 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return _stretch(s)


def deterministic(log_alpha: torch.Tensor) -> torch.Tensor:
    """The gates used at evaluation and export: the noise-free (u = 1/2) gate with beta = 1."""
    return _stretch(torch.sigmoid(log_alpha))


def noise_free(log_alpha: torch.Tensor) -> torch.Tensor:
    """The noise-free gate (u = 1/2, beta = 2/3): differentiable in ``log_alpha`` where 0 < z < 1."""
    return _stretch(torch.sigmoid(log_alpha / BETA))


def gates(log_alpha: torch.Tensor, regime: str, training: bool,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """The gates of ``regime`` in training or evaluation: the one place that decides them.

    Evaluation, generation, the sparsity report, both exports and the analyses all use
    ``gates(..., training=False)``; training uses ``training=True``. For ``noise-free`` the two
    are the same function.
    """
    if regime == "noise-free":
        return noise_free(log_alpha)
    if regime != "stochastic":
        raise ValueError(f"gate regime must be one of {REGIMES}, got {regime!r}")
    return sample(log_alpha, generator) if training else deterministic(log_alpha)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """Closed form P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def cdf(t: float | torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z <= t) for t in [0, 1)."""
    x = (torch.as_tensor(t, dtype=log_alpha.dtype, device=log_alpha.device) - GAMMA) / (ZETA - GAMMA)
    return torch.sigmoid(BETA * (torch.log(x) - torch.log1p(-x)) - log_alpha)


def expected(log_alpha: torch.Tensor) -> torch.Tensor:
    """E[z] = integral over [0, 1] of P(z > t) dt, by Gauss-Legendre quadrature; differentiable."""
    t = torch.as_tensor(_T, dtype=log_alpha.dtype, device=log_alpha.device)
    w = torch.as_tensor(_W, dtype=log_alpha.dtype, device=log_alpha.device)
    survival = 1.0 - cdf(t.view(-1, *([1] * log_alpha.dim())), log_alpha.unsqueeze(0))
    return torch.tensordot(w, survival, dims=1)
