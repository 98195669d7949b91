"""Offline quality metrics, measured by code the repo can rerun."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import torch

from gentrain.eval.diversity import diversity_scores


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


def heldout_batches(cfg: Any, batch_size: int = 128) -> Iterator[dict]:
    """One pass over the held-out shards (eval.shards, else the training shards), no augmentation,
    at most eval.num_samples images, in a fixed order."""
    from gentrain.data_pipeline.build import build_stream

    data = dataclasses.replace(cfg.data, shards=cfg.eval.shards or cfg.data.shards, num_workers=0, mode="epoch",
                               random_crop=False, random_flip=False, aspect_buckets=False)
    stream = build_stream(data, batch_size=batch_size, rank=0, world_size=1, seed=cfg.eval.seed)
    left = min(cfg.eval.num_samples, stream.samples_per_epoch)
    for batch in stream:
        if left <= 0:
            return
        take = min(left, len(batch["key"]))
        yield {k: v[:take] for k, v in batch.items()}
        left -= take


def psnr(mse: float, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (range 2)."""
    return 10 * math.log10(data_range ** 2 / max(mse, 1e-12))


@torch.no_grad()
def evaluate_autoencoder(objective: Any, cfg: Any) -> dict[str, float]:
    """Held-out reconstruction MSE/PSNR, KL (VAE) or codebook usage/perplexity (VQ-VAE)."""
    from gentrain.maths.bottleneck import code_statistics, kl_to_standard_normal

    if objective.data_key != "image":  # the 2-D MLP VAE: prior samples against the truth, recon on fresh points
        out = evaluate_toy2d(objective, cfg.data.toy2d, cfg.eval.num_samples, cfg.eval.seed)
        from gentrain.data_pipeline.toy2d import sample_toy2d

        x = sample_toy2d(cfg.data.toy2d, cfg.eval.num_samples, torch.Generator().manual_seed(cfg.eval.seed + 1))
        out["eval/recon_mse"] = float(((objective.reconstruct(x.to(objective.device)).cpu() - x) ** 2).mean())
        return out
    sq, n_px, n_img, kl_sum, codes = 0.0, 0, 0, 0.0, []
    recons = []
    for batch in heldout_batches(cfg):
        x = batch["image"].to(objective.device)
        r = objective.reconstruct(x)
        sq += float(((r.float() - x.float()) ** 2).sum())
        n_px += x.numel()
        n_img += x.shape[0]
        if cfg.model.family == "vqvae":
            codes.append(objective.codes(x).flatten().cpu())
        else:
            mean, logvar = objective.nets["ae"].encode(x)
            kl_sum += float(kl_to_standard_normal(mean.float(), logvar.float()).sum())
        if cfg.eval.digits:
            recons.append(r.cpu())
    mse = sq / max(n_px, 1)
    out = {"eval/recon_mse": mse, "eval/psnr": psnr(mse), "eval/images": float(n_img)}
    if codes:
        usage, perplexity = code_statistics(torch.cat(codes), objective.m.num_codes)
        out.update({"eval/codebook_usage": usage, "eval/perplexity": perplexity})
    else:
        out["eval/kl_per_image"] = kl_sum / max(n_img, 1)
    if cfg.eval.digits and recons:
        out.update(digits_scores(torch.cat(recons), cfg, prefix="eval/recon_"))
    return out


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


def evaluate_gan(objective: Any, cfg: Any) -> dict[str, float]:
    """2-D: energy distance beside real-vs-real, and on the mixtures with known modes the modes
    captured and the high-quality fraction of 2,500 samples; digits: the digits FD beside
    real-vs-real, and conditional accuracy for class or text (both prompt forms) with the intra-class
    diversity beside real digits' (1.0 = as varied within a class as real data)."""
    if cfg.data.source == "toy2d":
        out = evaluate_toy2d(objective, cfg.data.toy2d, cfg.eval.num_samples, cfg.eval.seed)
        if cfg.data.toy2d in ("ring8", "grid25"):
            from gentrain.data_pipeline.toy2d import toy2d_modes

            g = torch.Generator(objective.device).manual_seed(cfg.eval.seed + 1)
            centers, std = toy2d_modes(cfg.data.toy2d)
            samples = objective.sample(2500, generator=g).cpu()
            res = mode_metrics(samples, centers, std)
            strict = mode_metrics(samples, centers, std, min_hq=20)["modes"]
            out.update({"eval/modes": float(res["modes"]), "eval/modes_min20": float(strict),
                        "eval/num_modes": float(res["num_modes"]), "eval/hq_fraction": res["hq_fraction"]})
        return out
    if not cfg.eval.digits:
        return {}
    kind = objective.conditioning.kind
    return (evaluate_text_to_image_digits if kind == "text" else evaluate_generated_digits)(objective, cfg)


@torch.no_grad()
def evaluate_image2image(objective: Any, cfg: Any) -> dict[str, float]:
    """Held-out translation figures (eval.shards). Pix2Pix: L1 and PSNR of G(input) against the
    target, and (eval.digits) the digits classifier's accuracy on the outputs beside its accuracy on
    the real targets and on the raw inputs. CycleGAN: cycle L1 (A->B->A, B->A->B) and label
    preservation: the classifier (trained on plain, domain-A digits) on A->B->A and on B->A, beside
    the raw B images."""
    from gentrain.eval.digits import default_evaluator

    ev = default_evaluator(cfg.data.image_size) if cfg.eval.digits else None
    cycle = cfg.model.family == "cyclegan"
    sums: dict[str, float] = {}
    n_img, n_px = 0, 0

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    def hits(images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((ev.predict(images.clamp(-1, 1).cpu()) == labels.cpu()).sum())

    for batch in heldout_batches(cfg):
        if cycle:
            a, b = batch["image"].to(objective.device), batch["image_b"].to(objective.device)
            ab = objective.sample(len(a), {"input": a}, direction="ab")
            aba = objective.sample(len(a), {"input": ab}, direction="ba")
            ba = objective.sample(len(b), {"input": b}, direction="ba")
            bab = objective.sample(len(b), {"input": ba}, direction="ab")
            add("cycle_l1_a", float((aba - a).abs().sum()))
            add("cycle_l1_b", float((bab - b).abs().sum()))
            if ev is not None:
                add("acc_aba", hits(aba, batch["label"]))
                add("acc_ba", hits(ba, batch["label_b"]))
                add("acc_b_raw", hits(b, batch["label_b"]))
                add("acc_a_raw", hits(a, batch["label"]))
            n_px += a.numel()
        else:
            x, y = batch["input"].to(objective.device), batch["image"].to(objective.device)
            out = objective.sample(len(x), {"input": x})
            add("l1", float((out - y).abs().sum()))
            add("sq", float(((out - y) ** 2).sum()))
            if ev is not None:
                add("acc_out", hits(out, batch["label"]))
                add("acc_target", hits(y, batch["label"]))
                add("acc_input", hits(x, batch["label"]))
            n_px += y.numel()
        n_img += len(batch["image"])
    res: dict[str, float] = {"eval/images": float(n_img)}
    if cycle:
        res.update({"eval/cycle_l1_a": sums["cycle_l1_a"] / n_px, "eval/cycle_l1_b": sums["cycle_l1_b"] / n_px})
        if ev is not None:
            res.update({"eval/label_preservation_aba": sums["acc_aba"] / n_img,
                        "eval/label_preservation_ba": sums["acc_ba"] / n_img,
                        "eval/accuracy_real_a": sums["acc_a_raw"] / n_img,
                        "eval/accuracy_raw_b": sums["acc_b_raw"] / n_img})
    else:
        res.update({"eval/l1": sums["l1"] / n_px, "eval/psnr": psnr(sums["sq"] / n_px)})
        if ev is not None:
            res.update({"eval/accuracy": sums["acc_out"] / n_img, "eval/accuracy_real_targets": sums["acc_target"] / n_img,
                        "eval/accuracy_inputs": sums["acc_input"] / n_img})
    return res


def evaluate(objective: Any, cfg: Any) -> dict[str, float]:
    """The run's quality figures, chosen by the data and the family (eval_scope: not the evaluators
    whose own data source is not the run's)."""
    from gentrain.eval.scope import scoped

    cfg = scoped(cfg)
    if cfg.model.family in ("vae", "vqvae"):
        return evaluate_autoencoder(objective, cfg)
    if cfg.model.family == "gan":
        return evaluate_gan(objective, cfg)
    if cfg.model.family in ("pix2pix", "cyclegan"):
        return evaluate_image2image(objective, cfg)
    if cfg.model.family == "finetune":   # the validation loss on fixed (timestep, noise) pairs, and digits
        res = {"eval/val_loss": objective.validation()["val/loss"]}
        return {**res, **(evaluate_text_to_image_digits(objective, cfg) if cfg.eval.digits else {})}
    kind = getattr(getattr(objective, "conditioning", None), "kind", None)
    if kind == "text" and cfg.eval.shapes:
        from gentrain.eval.shapes import evaluate_text_to_image_shapes

        return evaluate_text_to_image_shapes(objective, cfg, seed=cfg.eval.seed)
    if getattr(objective, "space", None) is not None and cfg.eval.digits:
        return (evaluate_text_to_image_digits if kind == "text" else evaluate_generated_digits)(objective, cfg)
    if cfg.data.source == "toy2d":
        return evaluate_toy2d(objective, cfg.data.toy2d, cfg.eval.num_samples, cfg.eval.seed)
    return {}
