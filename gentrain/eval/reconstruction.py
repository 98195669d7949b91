"""An autoencoder's held-out reconstruction and bottleneck figures."""
from __future__ import annotations

from typing import Any

import torch

from gentrain.eval.digit_samples import digits_scores
from gentrain.eval.heldout import heldout_batches, psnr


@torch.no_grad()
def evaluate_reconstruction(objective: Any, cfg: Any, *, codebook: bool) -> dict[str, float]:
    """Held-out reconstruction MSE/PSNR, and KL per image (a VAE's posterior) or, with `codebook`, the
    codebook usage/perplexity (a VQ-VAE's codes); with eval.digits the digits scores of the
    reconstructions. The 2-D MLP VAE: reconstruction MSE on fresh points."""
    from gentrain.maths.bottleneck import code_statistics, kl_to_standard_normal

    if objective.data_key != "image":  # the 2-D MLP VAE (its prior samples: the toy2d evaluator)
        from gentrain.data_pipeline.toy2d import sample_toy2d

        x = sample_toy2d(cfg.data.toy2d, cfg.eval.num_samples, torch.Generator().manual_seed(cfg.eval.seed + 1))
        return {"eval/recon_mse": float(((objective.reconstruct(x.to(objective.device)).cpu() - x) ** 2).mean())}
    sq, n_px, n_img, kl_sum, codes = 0.0, 0, 0, 0.0, []
    recons = []
    for batch in heldout_batches(cfg):
        x = batch["image"].to(objective.device)
        r = objective.reconstruct(x)
        sq += float(((r.float() - x.float()) ** 2).sum())
        n_px += x.numel()
        n_img += x.shape[0]
        if codebook:
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
