"""Autoencoding families: VAE (Kingma & Welling 2014) and VQ-VAE (van den Oord et al. 2017), with
an optional VQGAN-style adversarial term (Esser et al. 2021) trained in its own phase.

VAE loss   = rec + beta * KL / D, KL = -1/2 sum(1 + log s^2 - m^2 - s^2) against N(0, I), D = data
             dims per sample, so beta = 1 with the MSE reconstruction is the ELBO for a Gaussian
             decoder of variance 1/2 (per data dimension); KL warm-up ramps beta from 0.
VQ-VAE loss = rec + ||sg(z_e) - z_q||^2 + beta * ||z_e - sg(z_q)||^2 (beta on the commitment term;
             diffusers' VQModel quantizer puts it on the codebook term, so its loss is not used).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gentrain.distributed.collectives import mean_over_ranks
from gentrain.errors import GentrainError
from gentrain.maths.bottleneck import code_statistics, kl_to_standard_normal
from gentrain.maths.gan_losses import d_loss
from gentrain.objectives.base import Objective, OptimizerSpec, Phase


@dataclass
class AdversarialConfig:
    enabled: bool = False
    start_step: int = 0              # the discriminator phase and the generator's GAN term start here
    weight: float = 0.5              # times the adaptive weight ||grad rec|| / ||grad gan|| at the decoder's last layer
    adaptive: bool = True
    lr: Optional[float] = None       # discriminator lr (default train.lr)
    layers: int = 2
    base_channels: int = 32
    norm: str = "group"              # group | instance | batch | none (batch: per-rank statistics; parity needs SyncBatchNorm)


@dataclass
class AutoencoderConfig:
    family: str = "vae"              # vae | vqvae
    net: str = "autoencoder_kl"      # vae: autoencoder_kl | mlp (2-D toys); vqvae: vqmodel
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])   # downsampling 2**(n-1)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    mid_attention: bool = False
    hidden: int = 128                # mlp
    latent_dim: int = 2              # mlp
    recon_loss: str = "mse"          # mse | l1
    beta: float = 1e-3               # vae: KL weight (per data dimension)
    kl_warmup_steps: int = 0         # vae: beta ramps linearly from 0 over these steps
    num_codes: int = 64              # vqvae: codebook size K
    commitment_beta: float = 0.25    # vqvae
    ema_codebook: bool = False       # vqvae: EMA codebook updates instead of the codebook loss
    codebook_ema_decay: float = 0.99
    dead_code_restart: bool = True   # vqvae: re-seed unused codes from encoder outputs
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def validate(self, cfg: Any) -> None:
        nets = {"vae": ("autoencoder_kl", "mlp"), "vqvae": ("vqmodel",)}[self.family]
        for key, value, allowed in (("net", self.net, nets), ("recon_loss", self.recon_loss, ("mse", "l1")),
                                    ("adversarial.norm", self.adversarial.norm, ("group", "instance", "batch", "none"))):
            if value not in allowed:
                raise GentrainError(f"config key 'model.{key}': {value!r} is not allowed; choose one of {', '.join(allowed)}")
        if (self.net == "mlp") != (cfg.data.source == "toy2d"):
            raise GentrainError(f"config key 'model.net': {self.net!r} does not fit data.source={cfg.data.source!r} "
                                "(mlp is for toy2d, image nets for shards)")
        if self.net != "mlp":
            if any(c % self.norm_num_groups for c in self.block_out_channels):
                raise GentrainError(f"config key 'model.norm_num_groups': {self.norm_num_groups} must divide every "
                                    f"model.block_out_channels {self.block_out_channels}")
            f = 2 ** (len(self.block_out_channels) - 1)
            if cfg.data.image_size % f:
                raise GentrainError(f"config key 'data.image_size': {cfg.data.image_size} is not divisible by the "
                                    f"autoencoder's downsampling factor {f}")
        if self.adversarial.enabled and self.net == "mlp":
            raise GentrainError("config key 'model.adversarial.enabled': the adversarial term needs an image net")
        if self.adversarial.enabled and cfg.data.image_size / 2 ** self.adversarial.layers < 3:
            raise GentrainError(f"config key 'model.adversarial.layers': {self.adversarial.layers} stride-2 layers leave "
                                f"less than 3 px of a {cfg.data.image_size}-px image; use fewer layers or larger images")
        if self.beta < 0 or self.commitment_beta < 0 or self.num_codes < 2:
            raise GentrainError("config keys 'model.beta', 'model.commitment_beta' must be >= 0 and 'model.num_codes' >= 2")


class AutoencoderObjective(Objective):
    """Shared by both families: reconstruction, the adversarial phase, previews, latent scale, export.

    `loss` runs on the loop's (possibly DDP-wrapped) nets; everything else (reconstruct, latents,
    sample, preview, export) is called with the unwrapped nets of the loop's sampling context.
    """

    Config = AutoencoderConfig
    ema_nets = ("ae",)

    def __init__(self, ae: torch.nn.Module, m: AutoencoderConfig, *, data_key: str, image_size: int):
        self.m, self.data_key, self.image_size = m, data_key, image_size
        self.nets = {"ae": ae}
        self.adv = m.adversarial if m.adversarial.enabled else None
        if self.adv:
            from gentrain.modeling.discriminators import PatchGAN

            self.nets["disc"] = PatchGAN(ae.model.config.in_channels, self.adv.base_channels, self.adv.layers, self.adv.norm)
            self.last_layer = ae.model.decoder.conv_out.weight   # same Parameter after DDP wrapping
        self.latent_shape = tuple(ae.latent_shape(image_size))   # read before the loop wraps the net
        self.preview_count = 8 if data_key == "image" else 4000
        self._preview_batch: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "AutoencoderObjective":
        from gentrain.modeling import autoencoders as A

        m, d = cfg.model, cfg.data
        common = dict(in_channels=d.channels, block_out_channels=list(m.block_out_channels),
                      latent_channels=m.latent_channels, layers_per_block=m.layers_per_block,
                      norm_num_groups=m.norm_num_groups, sample_size=d.image_size, mid_attention=m.mid_attention)
        if m.net == "mlp":
            return VAEObjective(A.MLPVAE(2, m.latent_dim, m.hidden), m, data_key="x", image_size=0)
        if m.family == "vae":
            return VAEObjective(A.KLAutoencoder(**common), m, data_key="image", image_size=d.image_size)
        ae = A.VQAutoencoder(num_codes=m.num_codes, ema_codebook=m.ema_codebook, ema_decay=m.codebook_ema_decay,
                             dead_code_restart=m.dead_code_restart, **common)
        return VQVAEObjective(ae, m, data_key="image", image_size=d.image_size)

    @property
    def zero3_problem(self) -> str | None:
        if self.adv and self.adv.adaptive:
            return ("the adversarial weight takes gradients with respect to the decoder's last layer outside the "
                    "engine (model.adversarial.adaptive=true)")
        if self.m.family == "vqvae" and (self.m.dead_code_restart or self.m.ema_codebook):
            return ("the VQ codebook is rewritten in place outside the optimizer "
                    "(model.dead_code_restart / model.ema_codebook)")
        return None

    def phases(self) -> list[Phase]:
        out = [Phase("ae", ("ae",))]
        if self.adv:
            out.append(Phase("disc", ("disc",), start=self.adv.start_step, optimizer=OptimizerSpec(lr=self.adv.lr)))
        return out

    # family-specific: (reconstruction, regulariser terms already weighted, logs)
    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        """Deterministic reconstruction (posterior mean / quantised), as an export would decode."""
        raise NotImplementedError

    def latents(self, x: Tensor) -> Tensor:
        """The latents a diffusion model would be trained on."""
        raise NotImplementedError

    def _recon_loss(self, recon: Tensor, x: Tensor) -> Tensor:
        return (F.mse_loss if self.m.recon_loss == "mse" else F.l1_loss)(recon.float(), x.float())

    def loss(self, phase: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        x = batch[self.data_key]
        if self._preview_batch is None:
            self._preview_batch = x[:8].detach().clone()
        if phase == "disc":
            with torch.no_grad():
                fake = self._forward(x)[0]
            d_real, d_fake = self.nets["disc"](x), self.nets["disc"](fake)
            loss = d_loss("hinge", d_real, d_fake)
            return loss, {"disc/real_logit": d_real.detach().mean(), "disc/fake_logit": d_fake.detach().mean()}
        recon, reg, logs = self._forward(x)
        rec = self._recon_loss(recon, x)
        loss = rec + reg
        logs["rec"] = rec.detach()
        if self.adv and self.step >= self.adv.start_step:
            g = -self.nets["disc"](recon).mean()
            w = self.adv.weight * (self._adaptive_weight(rec, g) if self.adv.adaptive else 1.0)
            loss = loss + w * g
            logs["gan/g_loss"], logs["gan/weight"] = g.detach(), w
        return loss, logs

    def _adaptive_weight(self, rec: Tensor, g: Tensor) -> Tensor:
        """||dL_rec/dW|| / ||dL_gan/dW|| at the decoder's last layer (Esser et al. 2021, eq. 7)."""
        g_rec = mean_over_ranks(torch.autograd.grad(rec, self.last_layer, retain_graph=True)[0])
        g_gan = mean_over_ranks(torch.autograd.grad(g, self.last_layer, retain_graph=True)[0])
        return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()

    @torch.no_grad()
    def preview(self, generator: torch.Generator | None = None) -> Tensor:
        if self.data_key != "image" or self._preview_batch is None:
            return self.sample(self.preview_count, generator=generator)
        x = self._preview_batch
        self.preview_nrow = x.shape[0]  # rows: originals, reconstructions, prior samples
        return torch.cat([x, self.reconstruct(x), self.sample(x.shape[0], generator=generator)])

    @torch.no_grad()
    def latent_scaling_factor(self, batches: Iterator[dict], max_items: int = 1024) -> float:
        """1 / std of the latents over a data sample: diffusers' `scaling_factor` (Rombach et al. 2022).
        The posterior samples are drawn from a fixed seed: exporting a checkpoint twice gives the same file."""
        zs, n = [], 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for batch in batches:
                z = self.latents(batch[self.data_key].to(self.device))
                zs.append(z.flatten().float().cpu())
                n += z.shape[0]
                if n >= max_items:
                    break
        return float(1.0 / torch.cat(zs).std())

    def export(self, out: Path, cfg: Any, batches: Iterator[dict]) -> dict[str, Any]:
        """A diffusers folder (AutoencoderKL / VQModel) with the measured scaling_factor."""
        if self.data_key != "image":
            raise GentrainError("the 2-D MLP VAE has no diffusers format; its weights export as safetensors only")
        scale = self.latent_scaling_factor(batches)
        model = self.nets["ae"].model
        model.register_to_config(scaling_factor=scale)
        model.save_pretrained(str(out), safe_serialization=True)
        return {"scaling_factor": scale, "diffusers_class": type(model).__name__}


class VAEObjective(AutoencoderObjective):
    @property
    def evaluates(self) -> tuple[str, ...]:
        return ("reconstruction_kl",) if self.data_key == "image" else ("toy2d", "reconstruction_kl")

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        noise = self.rng.randn(x.shape[0], *self.latent_shape, device=x.device)   # reparameterisation
        recon, mean, logvar = self.nets["ae"](x, noise)
        kl = kl_to_standard_normal(mean.float(), logvar.float()).mean() / x[0].numel()
        ramp = min(1.0, self.step / self.m.kl_warmup_steps) if self.m.kl_warmup_steps else 1.0
        return recon, self.m.beta * ramp * kl, {"kl": kl.detach()}

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.nets["ae"](x)[0]

    def latents(self, x: Tensor) -> Tensor:
        mean, logvar = self.nets["ae"].encode(x)
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, *, generator: torch.Generator | None = None, **kw: Any) -> Tensor:
        """Prior sampling: z ~ N(0, I), decoded."""
        ae = self.nets["ae"]
        z = torch.randn((n, *ae.latent_shape(self.image_size)), generator=generator, device=self.device)
        return ae.decode(z)


class VQVAEObjective(AutoencoderObjective):
    evaluates = ("reconstruction_vq",)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        ae = self.nets["ae"]
        recon, z_e, z_q, idx = ae(x)
        commit = F.mse_loss(z_e.float(), z_q.detach().float())
        reg = self.m.commitment_beta * commit
        if not self.m.ema_codebook:
            reg = reg + F.mse_loss(z_q.float(), z_e.detach().float())
        usage, perplexity = code_statistics(idx, self.m.num_codes)
        return recon, reg, {"vq/commit": commit.detach(), "vq/usage": usage, "vq/perplexity": perplexity}

    def reconstruct(self, x: Tensor) -> Tensor:
        ae = self.nets["ae"]
        z_q, _ = ae.quantize(ae.encode(x))
        return ae.decode(z_q)

    def latents(self, x: Tensor) -> Tensor:
        ae = self.nets["ae"]
        return ae.quantize(ae.encode(x))[0]

    def codes(self, x: Tensor) -> Tensor:
        ae = self.nets["ae"]
        return ae.quantize(ae.encode(x))[1]

    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, *, generator: torch.Generator | None = None, **kw: Any) -> Tensor:
        """Codes drawn uniformly (no learned prior over codes in this family), decoded."""
        ae = self.nets["ae"]
        _, h, w = ae.latent_shape(self.image_size)
        idx = torch.randint(0, self.m.num_codes, (n, h, w), generator=generator, device=self.device)
        return ae.decode_indices(idx)
