"""Conditional flow matching / rectified flow with the linear path (Lipman et al. 2023; Liu et al. 2023).

Convention (diffusers', shared by every gentrain family so exports sample correctly):
    x_t = (1 - t) * x_data + t * noise,   target velocity v = noise - x_data,
the network is called with ``timestep = t * 1000`` and sampling runs from t = 1 (noise) to t = 0.
The seed (and the flow_matching library) put noise at t = 0 and data at t = 1 instead; the two
are the same model under t -> 1 - t and v -> -v.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import GentrainError
from ..sampling import FLOW_SAMPLERS, flow_sigmas
from .base import Objective
from .latent import LatentConfig, LatentSpace


@dataclass
class FlowConfig:
    family: str = "flow"
    net: str = "mlp"                 # mlp: 2-D toy data; unet: text-conditioned latent model
    hidden: int = 256                # mlp
    depth: int = 4                   # mlp
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])   # unet
    layers_per_block: int = 1        # unet
    attention_head_dim: int = 8      # unet
    norm_num_groups: int = 16        # unet
    gradient_checkpointing: bool = False
    latent: LatentConfig = field(default_factory=LatentConfig)
    time_sampling: str = "uniform"   # uniform | logit_normal (SD3's, mean 0 std 1)
    sampler: str = "euler"           # euler | heun | euler_maruyama (SDE with the same marginals)
    sde_noise_scale: float = 1.0     # euler_maruyama: g_t = sde_noise_scale * t
    sample_steps: int = 50

    def validate(self, cfg: Any) -> None:
        for key, value, allowed in (("net", self.net, ("mlp", "unet")),
                                    ("time_sampling", self.time_sampling, ("uniform", "logit_normal")),
                                    ("sampler", self.sampler, tuple(FLOW_SAMPLERS))):
            if value not in allowed:
                raise GentrainError(f"config key 'model.{key}': {value!r} is not allowed; choose one of {', '.join(allowed)}")
        if self.net == "mlp" and cfg.data.source != "toy2d":
            raise GentrainError(f"config key 'model.net': 'mlp' is for 2-D toy data, but data.source is {cfg.data.source!r}")
        if self.net == "unet":
            if cfg.data.source != "shards":
                raise GentrainError("config key 'model.net': 'unet' trains on shards (images or cached latents)")
            if not self.latent.autoencoder or not self.latent.text_encoder:
                raise GentrainError("config keys 'model.latent.autoencoder' and 'model.latent.text_encoder' are required "
                                    "with model.net=unet")
            if any(c % self.norm_num_groups for c in self.block_out_channels):
                raise GentrainError(f"config key 'model.norm_num_groups': {self.norm_num_groups} must divide every "
                                    f"model.block_out_channels {self.block_out_channels}")
            if not 0 <= self.latent.cfg_dropout < 1:
                raise GentrainError(f"config key 'model.latent.cfg_dropout': {self.latent.cfg_dropout} must be in [0, 1)")
        if self.sample_steps < 1 or self.hidden < 1 or self.depth < 1:
            raise GentrainError("config keys 'model.sample_steps', 'model.hidden', 'model.depth' must be >= 1")


class LinearPath:
    """x_t = (1 - t) x0 + t x1 with x0 = data, x1 = noise; conversions between parameterisations."""

    @staticmethod
    def _b(t: Tensor, x: Tensor) -> Tensor:
        return t.reshape(-1, *([1] * (x.dim() - 1)))

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        t = self._b(t, x0)
        return (1 - t) * x0 + t * noise

    def velocity(self, x0: Tensor, noise: Tensor) -> Tensor:
        return noise - x0

    def x0_from_velocity(self, xt: Tensor, v: Tensor, t: Tensor) -> Tensor:
        return xt - self._b(t, xt) * v

    def noise_from_velocity(self, xt: Tensor, v: Tensor, t: Tensor) -> Tensor:
        return xt + (1 - self._b(t, xt)) * v


def sample_time(n: int, kind: str, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """t in (0, 1): uniform, or logit-normal (Esser et al. 2024, SD3) which favours mid t."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, device=device, generator=generator))
    return torch.rand(n, device=device, generator=generator)


class FlowMatchingObjective(Objective):
    """Velocity regression on the linear path; Euler/Heun ODE sampling from t=1 to t=0."""

    Config = FlowConfig
    ema_nets = ("velocity",)

    def __init__(self, net: torch.nn.Module, *, data_key: str = "x", sample_shape: tuple[int, ...] = (2,),
                 time_sampling: str = "uniform", sampler: str = "euler", sample_steps: int = 50,
                 preview_count: int = 16, sde_noise_scale: float = 1.0, space: LatentSpace | None = None,
                 cfg_dropout: float = 0.0, guidance_scale: float = 1.0):
        self.nets = {"velocity": net}
        self.path = LinearPath()
        self.data_key, self.sample_shape = data_key, sample_shape
        self.time_sampling, self.sampler, self.sample_steps = time_sampling, sampler, sample_steps
        self.preview_count, self.sde_noise_scale = preview_count, sde_noise_scale
        self.space, self.cfg_dropout, self.guidance_scale = space, cfg_dropout, guidance_scale
        self.preview_prompts: list[str] = []

    @classmethod
    def from_config(cls, cfg: Any) -> "FlowMatchingObjective":
        m: FlowConfig = cfg.model
        common = dict(time_sampling=m.time_sampling, sampler=m.sampler, sample_steps=m.sample_steps,
                      sde_noise_scale=m.sde_noise_scale)
        if m.net == "mlp":
            from ...modeling.mlp import TimeConditionedMLP

            net = TimeConditionedMLP(dim=2, hidden=m.hidden, depth=m.depth)
            return cls(net, preview_count=4000, **common)  # a 2-D density plot wants many points
        from ...modeling.denoisers import ConditionalUNet

        space = LatentSpace(m.latent)
        size = space.latent_size(cfg.data.image_size)
        net = ConditionalUNet(space.latent_channels, size, list(m.block_out_channels), space.text_encoder.dim,
                              m.layers_per_block, m.attention_head_dim, m.norm_num_groups, m.gradient_checkpointing)
        return cls(net, data_key="image", sample_shape=(space.latent_channels, size, size), space=space,
                   cfg_dropout=m.latent.cfg_dropout, guidance_scale=m.latent.guidance_scale, **common)

    def to(self, device: torch.device) -> "FlowMatchingObjective":
        super().to(device)
        if self.space is not None:
            self.space.to(device)
        return self

    def batch_size(self, batch: dict[str, Any]) -> int:
        return len(batch["key"]) if self.space is not None else super().batch_size(batch)

    def loss(self, phase: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        if self.space is not None:
            x0 = self.space.latents(batch)                                   # (B, c, h, w), scaled
            cond = {"emb": self.space.text(batch, self.cfg_dropout)}        # (B, L, D)
            if not self.preview_prompts:
                self.preview_prompts = list(batch["txt"][:8])
        else:
            x0, cond = batch[self.data_key], {}
        noise = torch.randn_like(x0)
        t = sample_time(x0.shape[0], self.time_sampling, x0.device)        # (B,)
        xt = self.path.interpolate(x0, noise, t)
        pred = self.nets["velocity"](xt, t * 1000, **cond)
        loss = F.mse_loss(pred.float(), self.path.velocity(x0, noise).float())
        return loss, {}

    def _velocity(self, emb: Tensor | None, uncond: Tensor | None, scale: float, timesteps: dict[float, float]):
        """v(x, t) with classifier-free guidance v_u + s (v_c - v_u); the network's timestep is t * 1000,
        or the scheduler's integer timestep for that sigma when a pipeline's grid is given."""
        net = self.nets["velocity"]

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            tn = torch.full_like(t, timesteps[float(t[0])]) if timesteps else t * 1000
            if emb is None:
                return net(x, tn)
            if scale == 1.0:
                return net(x, tn, emb=emb)
            v_u, v_c = net(torch.cat([x, x]), torch.cat([tn, tn]), emb=torch.cat([uncond, emb])).chunk(2)
            return v_u + scale * (v_c - v_u)
        return velocity

    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, *, generator: torch.Generator | None = None,
               steps: int | None = None, sampler: str | None = None, guidance_scale: float | None = None,
               sigmas: Tensor | None = None, timesteps: Tensor | None = None, decode: bool = True,
               **kw: Any) -> Tensor:
        """n samples; text models take cond={"prompts": [n strings]}. `sigmas`/`timesteps` (e.g. from an
        exported pipeline's scheduler) replace the uniform grid; decode=False returns latents."""
        device = self.device
        x = torch.randn((n, *self.sample_shape), generator=generator, device=device)
        sigmas = flow_sigmas(steps or self.sample_steps, device) if sigmas is None else sigmas.to(device)
        lookup = {float(s): float(t) for s, t in zip(sigmas.to(x.dtype), timesteps)} if timesteps is not None else {}
        emb = uncond = None
        if self.space is not None:
            prompts = (cond or {}).get("prompts")
            if not prompts or len(prompts) != n:
                raise GentrainError(f"a text-conditioned model needs cond={{'prompts': [{n} prompts]}}")
            emb, uncond = self.space.encode_prompts(list(prompts)), self.space.uncond(n)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        velocity = self._velocity(emb, uncond, scale, lookup)
        name = sampler or self.sampler
        if name == "euler_maruyama":
            x = FLOW_SAMPLERS[name](velocity, x, sigmas, self.sde_noise_scale, generator=generator)
        else:
            x = FLOW_SAMPLERS[name](velocity, x, sigmas)
        return self.space.decode(x) if (self.space is not None and decode) else x

    @torch.no_grad()
    def preview(self, generator: torch.Generator | None = None) -> Tensor:
        if self.space is None:
            return super().preview(generator)
        prompts = self.preview_prompts or [""] * 8
        self.preview_nrow, self.preview_captions = len(prompts), prompts
        return self.sample(len(prompts), {"prompts": prompts}, generator=generator)

    def export(self, out: Path, cfg: Any, batches: Any = None) -> dict[str, Any]:
        """A StableDiffusionPipeline folder that stock diffusers loads; flow sampling through
        DPMSolverMultistepScheduler(use_flow_sigmas, flow_prediction, order 1) = Euler on its grid."""
        if self.space is None:
            raise GentrainError("only text-conditioned latent flow models export to a diffusers pipeline")
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True,
                                                prediction_type="flow_prediction", final_sigmas_type="zero",
                                                solver_order=1, steps_offset=1)  # set, or the pipeline rewrites it
        pipe = StableDiffusionPipeline(vae=self.space.vae, text_encoder=self.space.text_encoder.model,
                                       tokenizer=self.space.text_encoder.tokenizer, unet=self.nets["velocity"].model,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(str(out), safe_serialization=True)
        return {"diffusers_class": "StableDiffusionPipeline", "guidance_scale": self.guidance_scale,
                "max_length": self.space.text_encoder.max_length}
