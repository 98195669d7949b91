"""Scores on the 2-D toy distributions: energy distance to the truth, and mode coverage."""
from __future__ import annotations

from typing import Any

import torch


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """E-statistic 2E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely & Rizzo 2013), V-statistic form; >= 0, 0 iff X~Y."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mode_metrics(samples: torch.Tensor, centers: torch.Tensor, std: float, *, min_hq: int = 1) -> dict[str, Any]:
    """Mode collapse on a 2-D gaussian mixture (ring8, grid25: ``toy2d_modes``), as VEEGAN
    (Srivastava et al. 2017) and PacGAN (Lin et al. 2018) score it.

    Each sample is assigned to its nearest centre (Euclidean; every mode has the same isotropic
    std); it is high quality (HQ) if its distance to that centre is below 3 * std (the Euclidean
    norm of the 2-D offset, not each coordinate). A mode is captured if at least ``min_hq`` HQ
    samples are assigned to it. The default 1 is the rule of PacGAN's released evaluation code
    (fjxmlzn/PacGAN, pacgan/extensions.py MetricLogger: "mode coverage" = modes with a nonzero
    HQ count, HQ = normalised distance < 3), used there on 2,500 samples; pass a larger
    ``min_hq`` for a stricter count (e.g. 20 of 2,500). Real samples are HQ with probability
    1 - exp(-4.5) = 98.89% (the 2-D gaussian's mass within radius 3 std).

    Returns {"modes": captured, "num_modes": K, "hq_fraction": HQ / N, "n": N}."""
    if samples.ndim != 2 or samples.shape[1] != 2 or centers.ndim != 2 or centers.shape[1] != 2:
        raise ValueError(f"mode_metrics: samples {tuple(samples.shape)} and centers {tuple(centers.shape)} "
                         "must both be (N, 2)")
    if len(samples) == 0:
        raise ValueError("mode_metrics: no samples")
    x, c = samples.detach().double().cpu(), centers.double().cpu()
    dist, nearest = torch.cdist(x, c).min(dim=1)
    hq = dist < 3 * std
    counts = torch.bincount(nearest[hq], minlength=len(c))
    return {"modes": int((counts >= max(1, min_hq)).sum()), "num_modes": len(c),
            "hq_fraction": float(hq.double().mean()), "n": len(x)}


@torch.no_grad()
def evaluate_toy2d(objective: Any, distribution: str, n: int, seed: int) -> dict[str, float]:
    """Energy distance of n generated points to n true ones, beside that of two real sets of n."""
    from gentrain.data_pipeline.toy2d import sample_toy2d

    g = torch.Generator().manual_seed(seed)
    real_a, real_b = sample_toy2d(distribution, n, g), sample_toy2d(distribution, n, g)
    gen = objective.sample(n, generator=torch.Generator(objective.device).manual_seed(seed)).cpu()
    return {"eval/energy_distance": energy_distance(gen, real_a),
            "eval/energy_distance_real_vs_real": energy_distance(real_b, real_a)}


def evaluate_toy2d_run(objective: Any, cfg: Any) -> dict[str, float]:
    """A 2-D toy run's energy distance at eval.num_samples points, eval.seed (:func:`evaluate_toy2d`)."""
    return evaluate_toy2d(objective, cfg.data.toy2d, cfg.eval.num_samples, cfg.eval.seed)


def evaluate_toy2d_modes(objective: Any, cfg: Any) -> dict[str, float]:
    """On the mixtures with known modes (ring8, grid25): the modes captured (at least 1 and at least
    20 high-quality samples) and the high-quality fraction of 2,500 samples."""
    if cfg.data.toy2d not in ("ring8", "grid25"):
        return {}
    from gentrain.data_pipeline.toy2d import toy2d_modes

    g = torch.Generator(objective.device).manual_seed(cfg.eval.seed + 1)
    centers, std = toy2d_modes(cfg.data.toy2d)
    samples = objective.sample(2500, generator=g).cpu()
    res = mode_metrics(samples, centers, std)
    strict = mode_metrics(samples, centers, std, min_hq=20)["modes"]
    return {"eval/modes": float(res["modes"]), "eval/modes_min20": float(strict),
            "eval/num_modes": float(res["num_modes"]), "eval/hq_fraction": res["hq_fraction"]}
