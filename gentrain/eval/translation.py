"""Image-to-image models scored on held-out pairs (eval.shards): Pix2Pix's paired translation and
CycleGAN's cycle consistency, with the digits classifier's accuracy where eval.digits is on."""
from __future__ import annotations

from typing import Any, Callable

import torch

from gentrain.eval.heldout import heldout_batches, psnr


def _tally(objective: Any, cfg: Any,
           score: Callable[[dict, Callable[[str, float], None], Any], int]) -> tuple[dict[str, float], int, int]:
    """Sums over the held-out batches of what `score(batch, add, hits)` adds (it returns the pixels it
    compared); with the digits classifier's `hits(images, labels)` when eval.digits is on, else None.
    Returns (sums, images, pixels)."""
    from gentrain.eval.digits import default_evaluator

    ev = default_evaluator(cfg.data.image_size) if cfg.eval.digits else None
    sums: dict[str, float] = {}
    n_img, n_px = 0, 0

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    def hits(images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((ev.predict(images.clamp(-1, 1).cpu()) == labels.cpu()).sum())

    for batch in heldout_batches(cfg):
        n_px += score(batch, add, hits if ev is not None else None)
        n_img += len(batch["image"])
    return sums, n_img, n_px


@torch.no_grad()
def evaluate_translation(objective: Any, cfg: Any) -> dict[str, float]:
    """Pix2Pix: L1 and PSNR of G(input) against the target, and (eval.digits) the digits
    classifier's accuracy on the outputs beside its accuracy on the real targets and on the raw inputs."""
    def score(batch: dict, add: Callable[[str, float], None], hits: Any) -> int:
        x, y = batch["input"].to(objective.device), batch["image"].to(objective.device)
        out = objective.sample(len(x), {"input": x})
        add("l1", float((out - y).abs().sum()))
        add("sq", float(((out - y) ** 2).sum()))
        if hits is not None:
            add("acc_out", hits(out, batch["label"]))
            add("acc_target", hits(y, batch["label"]))
            add("acc_input", hits(x, batch["label"]))
        return y.numel()

    sums, n_img, n_px = _tally(objective, cfg, score)
    res = {"eval/images": float(n_img), "eval/l1": sums["l1"] / n_px, "eval/psnr": psnr(sums["sq"] / n_px)}
    if cfg.eval.digits:
        res.update({"eval/accuracy": sums["acc_out"] / n_img, "eval/accuracy_real_targets": sums["acc_target"] / n_img,
                    "eval/accuracy_inputs": sums["acc_input"] / n_img})
    return res


@torch.no_grad()
def evaluate_cycle(objective: Any, cfg: Any) -> dict[str, float]:
    """CycleGAN: cycle L1 (A->B->A, B->A->B) and label preservation: the digits classifier (trained
    on plain, domain-A digits) on A->B->A and on B->A, beside the raw A and B images."""
    def score(batch: dict, add: Callable[[str, float], None], hits: Any) -> int:
        a, b = batch["image"].to(objective.device), batch["image_b"].to(objective.device)
        ab = objective.sample(len(a), {"input": a}, direction="ab")
        aba = objective.sample(len(a), {"input": ab}, direction="ba")
        ba = objective.sample(len(b), {"input": b}, direction="ba")
        bab = objective.sample(len(b), {"input": ba}, direction="ab")
        add("cycle_l1_a", float((aba - a).abs().sum()))
        add("cycle_l1_b", float((bab - b).abs().sum()))
        if hits is not None:
            add("acc_aba", hits(aba, batch["label"]))
            add("acc_ba", hits(ba, batch["label_b"]))
            add("acc_b_raw", hits(b, batch["label_b"]))
            add("acc_a_raw", hits(a, batch["label"]))
        return a.numel()

    sums, n_img, n_px = _tally(objective, cfg, score)
    res = {"eval/images": float(n_img), "eval/cycle_l1_a": sums["cycle_l1_a"] / n_px,
           "eval/cycle_l1_b": sums["cycle_l1_b"] / n_px}
    if cfg.eval.digits:
        res.update({"eval/label_preservation_aba": sums["acc_aba"] / n_img,
                    "eval/label_preservation_ba": sums["acc_ba"] / n_img,
                    "eval/accuracy_real_a": sums["acc_a_raw"] / n_img,
                    "eval/accuracy_raw_b": sums["acc_b_raw"] / n_img})
    return res
