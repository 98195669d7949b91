"""Intra-class diversity of generated digits: does a conditional model use its noise within a class?

A conditional generator can score full accuracy while drawing one image per class (mode collapse
per class): accuracy reads the class, and a class-pooled FD mixes the ten classes' spread with the
spread between them. This figure reads the spread inside each class:

  diversity = mean over classes c of  D(generated of class c) / D(real digits of class c)

where D(S) is the mean pairwise Euclidean distance between distinct members of S (a U-statistic:
its expectation does not depend on |S|, so generated and real sets of different sizes compare).
1.0: as varied within a class as the real digits; 0: the same image for every noise draw.
Distances are on the digits classifier's 64-d features (the FD's features, not Inception), and,
as ``diversity_pixel``, on the raw pixels. The real reference of each class is one random half of
that class's real digits (all 1,797, seeded); ``diversity_real`` is the other half scored the same
way: the figure a sample as varied as real data gets (about 1.0) and how much it moves by chance.
"""
from __future__ import annotations

from typing import Any

import torch


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean Euclidean distance between the distinct rows (i != j) of (N, ...) ``x``; N >= 2."""
    x = x.flatten(1).double()
    n = len(x)
    if n < 2:
        raise ValueError("mean_pairwise_distance needs at least 2 rows")
    return float(torch.cdist(x, x).sum() / (n * (n - 1)))


def _halves(labels: torch.Tensor, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.nonzero(labels == c).flatten()
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(20_000 + 10 * seed + c))]
    return idx[: len(idx) // 2], idx[len(idx) // 2:]


@torch.no_grad()
def intra_class_diversity(evaluator: Any, images: Any, labels: Any, seed: int = 0) -> dict[str, float]:
    """{"diversity", "diversity_pixel": generated images' figure (module docstring) in feature and
    pixel space; "diversity_real", "diversity_real_pixel": a disjoint real half's; "diversity_min":
    the lowest class's feature figure}. ``images`` (N, C, H, W) in [-1, 1] at the evaluator's size,
    ``labels`` (N,) their intended digits; classes with fewer than 2 images are left out."""
    from gentrain.eval.digits import real_digits

    x = evaluator._check(images)
    labels = torch.as_tensor(labels).flatten().cpu()
    if len(labels) != len(x):
        raise ValueError(f"{len(x)} images but {len(labels)} labels")
    feats = evaluator.features(x)
    real, real_labels = real_digits(evaluator.size, 1, evaluator.shard_size)
    real_feats = getattr(evaluator, "_diversity_real_features", None)  # once per evaluator: every eval reuses it
    if real_feats is None:
        real_feats = evaluator._diversity_real_features = evaluator.features(real)
    ratios: dict[str, list[float]] = {"diversity": [], "diversity_pixel": [], "diversity_real": [],
                                      "diversity_real_pixel": []}
    for c in range(10):
        mine = labels == c
        if int(mine.sum()) < 2:
            continue
        ref, other = _halves(real_labels, c, seed)
        for key, gen, ref_set in (("diversity", feats, real_feats), ("diversity_pixel", x, real)):
            d_ref = mean_pairwise_distance(ref_set[ref])
            ratios[key].append(mean_pairwise_distance(gen[mine]) / d_ref)
            ratios[key.replace("diversity", "diversity_real")].append(mean_pairwise_distance(ref_set[other]) / d_ref)
    if not ratios["diversity"]:
        raise ValueError("intra_class_diversity needs at least 2 images of some class")
    out = {k: sum(v) / len(v) for k, v in ratios.items()}
    out["diversity_min"] = min(ratios["diversity"])
    out["diversity_classes"] = float(len(ratios["diversity"]))
    return out


def diversity_scores(samples: dict[int, torch.Tensor], size: int, seed: int = 0) -> dict[str, float]:
    """``eval/diversity*`` (:func:`intra_class_diversity`) of the samples of every seed together,
    each seed's (n, C, H, W) samples asked for digits 0-9 in turn (labels arange(n) % 10), as the
    conditional digits evaluations draw them."""
    from gentrain.eval.digits import default_evaluator

    images = torch.cat(list(samples.values()))
    labels = torch.cat([torch.arange(len(s)) % 10 for s in samples.values()])
    res = intra_class_diversity(default_evaluator(size), images, labels, seed)
    return {f"eval/{k}": float(v) for k, v in res.items()}
