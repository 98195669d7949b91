"""Training timesteps and loss weighting of SD3-style flow models (Esser et al. 2024), as diffusers'
training scripts draw them (examples/dreambooth/train_dreambooth_sd3.py, train_dreambooth_lora_sd3.py):

    u       = diffusers.training_utils.compute_density_for_timestep_sampling(scheme, B, mean, std, mode_scale)
    index   = (u * num_train_timesteps).long()
    sigma   = scheduler.sigmas[index],  timestep = scheduler.timesteps[index] (= sigma * num_train_timesteps)
    x_t     = (1 - sigma) x0 + sigma noise,  target noise - x0
    loss    = mean_b mean((compute_loss_weighting_for_sd3(scheme, sigma) * (pred - target)**2)[b])

The scheduler's sigmas are those of a FlowMatchEulerDiscreteScheduler built fresh from the pipeline's
scheduler config (its `shift` already in them), never the pipeline's own scheduler object, which
`set_timesteps` rewrites on every preview. A scheduler with `use_dynamic_shifting` (FLUX.1, Qwen-Image) builds
its grid unshifted (the shift depends on the image's token count and is applied at sampling through the
pipeline's `mu`): diffusers' train_dreambooth_lora_flux.py and train_dreambooth_lora_qwen_image.py train on that
unshifted grid, and so does this. u is drawn through gentrain's BatchRNG (diffusers' function
takes a generator), so a resumed or re-split run draws the same u.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from gentrain.errors import GentrainError
from gentrain.maths.rng import BatchRNG

# diffusers' names; u is uniform for every scheme but logit_normal and mode (those two shape u instead of the loss)
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")


def sample_density(rng: BatchRNG, n: int, scheme: str, logit_mean: float, logit_std: float, mode_scale: float,
                   device: Any = None) -> Tensor:
    """(n,) u in (0, 1) from diffusers' compute_density_for_timestep_sampling, drawn through `rng`."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    def draw(size: tuple[int, ...], generator: Optional[torch.Generator] = None, device: Any = None) -> Tensor:
        return compute_density_for_timestep_sampling(scheme, size[0], logit_mean=logit_mean, logit_std=logit_std,
                                                     mode_scale=mode_scale, device=device or "cpu", generator=generator)

    return rng.rows(draw, n, device=device)


def loss_weighting(scheme: str, sigmas: Tensor) -> Tensor:
    """diffusers' compute_loss_weighting_for_sd3: 1 / sigma^2 (sigma_sqrt), the cosmap weight, else ones."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas)


def check_flow_match_scheduler(scheduler: Any, pretrained: str, dynamic: bool = True) -> None:
    """One line unless `scheduler` is a FlowMatchEulerDiscreteScheduler (its training grid is SchedulerSigmas'),
    and, with dynamic=False, one with a fixed shift."""
    name, shifting = type(scheduler).__name__, bool(scheduler.config.get("use_dynamic_shifting"))
    if name != "FlowMatchEulerDiscreteScheduler" or (shifting and not dynamic):
        raise GentrainError(f"config key 'model.pretrained': {pretrained!r} has a {name}"
                            f"{' with dynamic shifting' if shifting else ''}; its fine-tuning trains on a "
                            f"FlowMatchEulerDiscreteScheduler's {'sigmas' if dynamic else 'fixed-shift sigmas'}")


class SchedulerSigmas:
    """The training grid of a flow-match scheduler config: sigmas (shift applied) and timesteps, index i
    in [0, num_train_timesteps) from sigma ~ 1 (i = 0) down to shift / (N + (shift - 1)) (i = N - 1)."""

    def __init__(self, scheduler_config: Any):
        from diffusers import FlowMatchEulerDiscreteScheduler

        fresh = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
        self.num_train_timesteps = int(fresh.config.num_train_timesteps)
        self.sigmas = fresh.sigmas[:self.num_train_timesteps].float().clone()
        self.timesteps = fresh.timesteps[:self.num_train_timesteps].float().clone()

    def __call__(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(sigma, timestep) at index (u * N).long(); u = 0 exactly under the mode scheme maps to index N,
        which diffusers' scripts would index out of range: clamped to N - 1."""
        index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1).cpu()
        return self.sigmas[index].to(u.device), self.timesteps[index].to(u.device)


def weighted_flow_loss(pred: Tensor, target: Tensor, weighting: Tensor, reduce: bool = True) -> Tensor:
    """The scripts' loss: per sample the mean of weighting * squared error, then the batch mean (reduce=False:
    the (B,) per-sample losses, for a weighted batch mean)."""
    w = weighting.float().reshape(-1, *([1] * (pred.dim() - 1)))
    per_sample = (w * (pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(1)
    return per_sample.mean() if reduce else per_sample
