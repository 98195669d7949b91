"""Offline quality metrics, measured by code the repo can rerun: the one evaluator registry.

A family declares what it can be scored on (`Objective.evaluates`, a tuple of the names below);
:func:`evaluate` runs those evaluators in order and merges their figures. An evaluator whose own
switch is off (eval.digits, eval.shapes) or whose data does not apply returns nothing. eval/ never
imports the families: it reads only what every objective declares (sample, conditioning.kind,
guidance_scale, data_key, device) and the methods its names promise (reconstruct, encode's
posterior, codes, validation).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

from gentrain.eval.digit_samples import (DIGIT_PROMPTS, digit_prompts, digits_scores, evaluate_digits,
                                         evaluate_generated_digits, evaluate_text_to_image_digits, fd_over_seeds,
                                         sample_digit_prompts, score_text_to_image_digits)
from gentrain.eval.heldout import heldout_batches, psnr
from gentrain.eval.reconstruction import evaluate_reconstruction
from gentrain.eval.toy2d import (energy_distance, evaluate_toy2d, evaluate_toy2d_modes, evaluate_toy2d_run,
                                 mode_metrics)
from gentrain.eval.translation import evaluate_cycle, evaluate_translation

# the scorers by job live in their modules; these names are re-exported for the tests, benches and old imports
__all__ = ["DIGIT_PROMPTS", "EVALUATORS", "digit_prompts", "digits_scores", "energy_distance", "evaluate",
           "evaluate_generated_digits", "evaluate_text_to_image_digits", "evaluate_toy2d", "fd_over_seeds",
           "heldout_batches", "mode_metrics", "psnr", "sample_digit_prompts", "score_text_to_image_digits"]


def evaluate_shapes(objective: Any, cfg: Any) -> dict[str, float]:
    """With eval.shapes: the shapes checker on the model's own procedural prompts (shapes.py)."""
    if not cfg.eval.shapes:
        return {}
    from gentrain.eval.shapes import evaluate_text_to_image_shapes

    return evaluate_text_to_image_shapes(objective, cfg, seed=cfg.eval.seed)


def evaluate_validation_loss(objective: Any, cfg: Any) -> dict[str, float]:
    """The training loss on held-out images with fixed (timestep, noise) pairs (`objective.validation`)."""
    return {"eval/val_loss": objective.validation()["val/loss"]}


# what an objective can be scored on -> (objective, cfg) -> {"eval/...": figure}
EVALUATORS: dict[str, Callable[[Any, Any], dict[str, float]]] = {
    # 2-D toys: energy distance of eval.num_samples samples to the truth, beside real-vs-real
    "toy2d": evaluate_toy2d_run,
    # 2-D mixtures with known modes (ring8, grid25): modes captured, high-quality fraction
    "toy2d_modes": evaluate_toy2d_modes,
    # held-out reconstruction MSE/PSNR and KL per image (VAE) / codebook usage and perplexity (VQ-VAE)
    "reconstruction_kl": partial(evaluate_reconstruction, codebook=False),
    "reconstruction_vq": partial(evaluate_reconstruction, codebook=True),
    # generated digits (eval.digits): text (both prompt forms), class labels 0-9, or unconditional
    "digits": evaluate_digits,
    # text-to-image on procedural coloured shapes (eval.shapes)
    "shapes": evaluate_shapes,
    # Pix2Pix: paired translation L1/PSNR (+ digits accuracy); CycleGAN: cycle L1, label preservation
    "translation": evaluate_translation,
    "cycle": evaluate_cycle,
    # a fine-tune's held-out loss on fixed (timestep, noise) pairs
    "validation_loss": evaluate_validation_loss,
}


def evaluate(objective: Any, cfg: Any) -> dict[str, float]:
    """The run's quality figures: each evaluator the objective declares (`evaluates`), in order,
    merged (eval_scope: not the evaluators whose own data source is not the run's)."""
    from gentrain.eval.scope import scoped

    cfg = scoped(cfg)
    unknown = [n for n in objective.evaluates if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"{type(objective).__name__} declares evaluators {unknown} that gentrain.eval does not have; "
                         f"known: {', '.join(EVALUATORS)}")
    out: dict[str, float] = {}
    for name in objective.evaluates:
        out.update(EVALUATORS[name](objective, cfg))
    return out
