"""Generated digits scored by the offline digits classifier (digits.py): accuracy for the label or
prompt asked for, the digits-feature FD beside real-vs-real (NOT Inception FID), intra-class diversity."""
from __future__ import annotations

from typing import Any

import torch

from gentrain.eval.diversity import diversity_scores


def digits_scores(images: torch.Tensor, cfg: Any, *, labels: torch.Tensor | None = None,
                  prefix: str = "eval/") -> dict[str, float]:
    """FD on the offline digits classifier's features (NOT Inception FID), beside real-vs-real."""
    from gentrain.eval.digits import evaluate_images

    res = evaluate_images(images, labels=labels, seed=cfg.eval.seed)
    return {f"{prefix}{k}": float(v) for k, v in res.items() if v is not None}


DIGIT_PROMPTS = {"numeral": "a handwritten digit {n}", "word": "a handwritten digit {w}"}


def digit_prompts(form: str, n: int) -> list[str]:
    """n prompts of one form (DIGIT_PROMPTS), digits 0-9 in turn."""
    from gentrain.data_pipeline.sources import DIGIT_WORDS

    return [DIGIT_PROMPTS[form].format(n=i % 10, w=DIGIT_WORDS[i % 10]) for i in range(n)]


@torch.no_grad()
def sample_digit_prompts(objective: Any, form: str, n: int, seed: int, guidance_scale: float,
                         batch_size: int = 250) -> torch.Tensor:
    """(n, C, H, W) samples in [-1, 1] for :func:`digit_prompts`, one generator seeded with ``seed``."""
    g = torch.Generator(objective.device).manual_seed(seed)
    prompts, chunks = digit_prompts(form, n), []
    for i in range(0, n, batch_size):
        p = prompts[i:i + batch_size]
        chunks.append(objective.sample(len(p), {"prompts": p}, generator=g, guidance_scale=guidance_scale)
                      .clamp(-1, 1).cpu())
    return torch.cat(chunks)


def fd_over_seeds(numeral: dict[int, torch.Tensor], size: int) -> dict[str, Any]:
    """Digits-classifier FD (NOT Inception FID) of each seed's samples against that seed's real set
    of the same N, beside that real set against a disjoint one; means over the seeds and per seed."""
    from gentrain.eval.digits import default_evaluator

    ev = default_evaluator(size)
    per_seed = {s: ev.evaluate_images(images, seed=s) for s, images in numeral.items()}
    fds, rvr = [r["fd"] for r in per_seed.values()], [r["fd_real_vs_real"] for r in per_seed.values()]
    return {"fd": sum(fds) / len(fds), "fd_real_vs_real": sum(rvr) / len(rvr), "n": next(iter(per_seed.values()))["n"],
            "seeds": list(per_seed), "fd_per_seed": fds, "fd_real_vs_real_per_seed": rvr}


def score_text_to_image_digits(numeral: dict[int, torch.Tensor], word: torch.Tensor, size: int) -> dict[str, float]:
    """The text-to-image digits figures from samples of :func:`digit_prompts`: accuracy per prompt
    form at the first seed (numeral[first seed], word), FD of the numeral samples as the mean over
    the seeds (:func:`fd_over_seeds`), the intra-class diversity of the numeral samples of all seeds
    beside real digits' (diversity.py). Used by the run's eval and by bench/t2i_vs_baseline.py."""
    from gentrain.eval.digits import default_evaluator

    ev, first = default_evaluator(size), next(iter(numeral))
    out = {}
    for form, images in (("numeral", numeral[first]), ("word", word)):
        out[f"eval/accuracy_{form}"] = float((ev.predict(images) == torch.arange(len(images)) % 10).float().mean())
    fd = fd_over_seeds(numeral, size)
    out.update({"eval/fd": fd["fd"], "eval/fd_real_vs_real": fd["fd_real_vs_real"], "eval/fd_n": float(fd["n"]),
                "eval/fd_seeds": float(len(numeral)), **diversity_scores(numeral, size, first)})
    return out


@torch.no_grad()
def evaluate_text_to_image_digits(objective: Any, cfg: Any, guidance_scale: float | None = None,
                                  batch_size: int = 250) -> dict[str, float]:
    """Conditional accuracy per prompt form (the digits classifier reads the digit the prompt asked
    for) and the digits-feature FD of the numeral-form samples against real images at the same N,
    beside real-vs-real (NOT Inception FID), both the mean over eval.fd_seeds seeds (eval.seed, +1,
    ...: fresh samples and fresh real sets each); accuracy at eval.seed. N = eval.num_samples,
    digits 0-9 in turn."""
    n, scale = cfg.eval.num_samples, guidance_scale if guidance_scale is not None else objective.guidance_scale
    seeds = [cfg.eval.seed + k for k in range(max(1, cfg.eval.fd_seeds))]
    numeral = {s: sample_digit_prompts(objective, "numeral", n, s, scale, batch_size) for s in seeds}
    word = sample_digit_prompts(objective, "word", n, seeds[0], scale, batch_size)
    out = score_text_to_image_digits(numeral, word, cfg.data.image_size)
    return {"eval/guidance_scale": float(scale), **out} if scale is not None else out


@torch.no_grad()
def evaluate_generated_digits(objective: Any, cfg: Any, guidance_scale: float | None = None,
                              batch_size: int = 250) -> dict[str, float]:
    """Class-conditional (labels 0-9 in turn: accuracy of the digits classifier, and the intra-class
    diversity beside real digits', diversity.py) or unconditional digits models: FD as the mean over
    eval.fd_seeds seeds, beside real-vs-real (NOT Inception FID)."""
    from gentrain.eval.digits import default_evaluator

    n, scale = cfg.eval.num_samples, guidance_scale if guidance_scale is not None else objective.guidance_scale
    labels = torch.arange(n) % 10
    conditional = objective.conditioning.kind == "class"
    samples = {}
    for s in [cfg.eval.seed + k for k in range(max(1, cfg.eval.fd_seeds))]:
        g, chunks = torch.Generator(objective.device).manual_seed(s), []
        for i in range(0, n, batch_size):
            lab = labels[i:i + batch_size].tolist()
            chunks.append(objective.sample(len(lab), {"labels": lab} if conditional else None, generator=g,
                                           guidance_scale=scale).clamp(-1, 1).cpu())
        samples[s] = torch.cat(chunks)
    fd = fd_over_seeds(samples, cfg.data.image_size)
    out = {"eval/fd": fd["fd"], "eval/fd_real_vs_real": fd["fd_real_vs_real"], "eval/fd_n": float(fd["n"]),
           "eval/fd_seeds": float(len(samples))}
    if conditional:
        first = samples[cfg.eval.seed]
        if scale is not None:
            out["eval/guidance_scale"] = float(scale)
        out["eval/accuracy"] = float((default_evaluator(cfg.data.image_size).predict(first) == labels).float().mean())
        out.update(diversity_scores(samples, cfg.data.image_size, cfg.eval.seed))
    return out


def evaluate_digits(objective: Any, cfg: Any) -> dict[str, float]:
    """With eval.digits: a text-conditioned model on both prompt forms
    (:func:`evaluate_text_to_image_digits`), any other on labels 0-9 or unconditionally
    (:func:`evaluate_generated_digits`)."""
    if not cfg.eval.digits:
        return {}
    kind = objective.conditioning.kind
    return (evaluate_text_to_image_digits if kind == "text" else evaluate_generated_digits)(objective, cfg)
