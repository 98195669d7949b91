"""Post-hoc EMA: power-function EMA profiles and the least-squares reconstruction of an EMA of any
length from snapshots of them (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models", section 3 and appendix C). Pure maths, no training code.

A power-function EMA with exponent gamma averages the weights theta(x) seen up to time t with the
kernel p(x) = (gamma + 1) x^gamma / t^(gamma + 1) on [0, t]. Its relative standard deviation is
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), in (0, 12^-1/2 = 0.2887) for gamma > 0.
Updated once per step with beta_t = (1 - 1/t)^(gamma + 1), step tau's weights get the kernel's mass
on (tau - 1, tau] exactly: the discrete EMA is the continuous one of the piecewise-constant weights.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SIGMA_REL_MAX = 1 / math.sqrt(12)   # sigma_rel at gamma = 0; larger lengths need gamma < 0


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel of the power-function kernel with exponent gamma (EDM2 eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose kernel has relative length sigma_rel in (0, 0.2887): the largest
    real root of sigma^2 (gamma + 2)^2 (gamma + 3) = gamma + 1, i.e. of
    gamma^3 + 7 gamma^2 + (16 - 1/sigma^2) gamma + (12 - 1/sigma^2) = 0."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel {sigma_rel!r} must be in (0, {SIGMA_REL_MAX:.4f})")
    c = 1 / sigma_rel ** 2
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_beta(t: int, gamma: float) -> float:
    """The decay of update number t (t >= 1): (1 - 1/t)^(gamma + 1); 0 at t = 1 (the EMA starts at the weights)."""
    return (1.0 - 1.0 / t) ** (gamma + 1)


def power_weights(t: int, gamma: float) -> np.ndarray:
    """The weight of each step 1..t in the profile at update t: (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1)
    (the kernel's mass on (tau - 1, tau]; they sum to 1)."""
    tau = np.arange(1, t + 1, dtype=np.float64) / t
    return tau ** (gamma + 1) - (tau - 1 / t) ** (gamma + 1)


def kernel_inner(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = integral of p_a(x) p_b(x) dx for every pair (broadcast). With m = min(t_a, t_b):
    (g_a+1)(g_b+1)/(g_a+g_b+1) * (m/t_a)^(g_a+1) * (m/t_b)^(g_b+1) / m, written with ratios <= 1 so
    that t^(gamma+1) never overflows."""
    m = np.minimum(t_a, t_b)
    return ((g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (m / t_a) ** (g_a + 1) * (m / t_b) ** (g_b + 1) / m)


def reconstruction_coefficients(ts: Sequence[float], gammas: Sequence[float], t_r: float, gamma_r: float) -> np.ndarray:
    """Coefficients x of the stored profiles (snapshot i: update count ts[i], exponent gammas[i]) whose
    combination sum_i x_i p_i is closest in L2 to the kernel p_r (t_r, gamma_r): the normal
    equations A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_r> (EDM2 appendix C.3), solved by least
    squares in float64. The EMA of length sigma_rel(gamma_r) at t_r is then sum_i x_i theta_i."""
    t = np.asarray(ts, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    if t.ndim != 1 or t.shape != g.shape or not len(t):
        raise ValueError("need one update count and one gamma per stored profile, at least one")
    scale = max(float(t.max()), float(t_r))   # the kernels are scale-free: keep times in (0, 1]
    t, t_r = t / scale, t_r / scale
    a = kernel_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = kernel_inner(t, g, np.float64(t_r), np.float64(gamma_r))
    return np.linalg.lstsq(a, b, rcond=None)[0]


def residual(ts: Sequence[float], gammas: Sequence[float], t_r: float, gamma_r: float, x: np.ndarray) -> float:
    """Relative L2 error ||sum_i x_i p_i - p_r|| / ||p_r|| of a reconstruction (0: exact)."""
    t = np.asarray(ts, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    scale = max(float(t.max()), float(t_r))
    t, t_r = t / scale, t_r / scale
    a = kernel_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = kernel_inner(t, g, np.float64(t_r), np.float64(gamma_r))
    rr = float(kernel_inner(np.float64(t_r), np.float64(gamma_r), np.float64(t_r), np.float64(gamma_r)))
    return math.sqrt(max(float(x @ a @ x - 2 * x @ b + rr), 0.0) / rr)
