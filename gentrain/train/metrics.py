"""Offline quality metrics, measured by code the repo can rerun."""
from __future__ import annotations

from typing import Any

import torch


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """E-statistic 2E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely & Rizzo 2013), V-statistic form; >= 0, 0 iff X~Y."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


@torch.no_grad()
def evaluate_toy2d(objective: Any, distribution: str, n: int, seed: int) -> dict[str, float]:
    """Energy distance of n generated points to n true ones, beside that of two real sets of n."""
    from ..data_pipeline.toy2d import sample_toy2d

    g = torch.Generator().manual_seed(seed)
    real_a, real_b = sample_toy2d(distribution, n, g), sample_toy2d(distribution, n, g)
    gen = objective.sample(n, generator=torch.Generator(objective.device).manual_seed(seed)).cpu()
    return {"eval/energy_distance": energy_distance(gen, real_a),
            "eval/energy_distance_real_vs_real": energy_distance(real_b, real_a)}


def evaluate(objective: Any, cfg: Any) -> dict[str, float]:
    """The run's quality figures, chosen by the data it trains on."""
    if cfg.data.source == "toy2d":
        return evaluate_toy2d(objective, cfg.data.toy2d, cfg.eval.num_samples, cfg.eval.seed)
    return {}
