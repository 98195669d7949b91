"""Autoencoder networks: diffusers AutoencoderKL / VQModel behind small wrappers whose forward()
returns what the objectives need (so DDP sees one forward per step), and an MLP VAE for 2-D toys.

The wrappers hold the diffusers model as ``.model``: exports call ``.model.save_pretrained``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from gentrain.distributed.collectives import global_rows, sum_


def _diffusers_args(in_channels: int, block_out_channels: list[int], latent_channels: int, layers_per_block: int,
                    norm_num_groups: int, sample_size: int, mid_attention: bool) -> dict:
    """The constructor arguments AutoencoderKL and VQModel share (one level per channel count)."""
    n = len(block_out_channels)
    return dict(in_channels=in_channels, out_channels=in_channels, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                sample_size=sample_size, mid_block_add_attention=mid_attention)


def reparameterised(vae: nn.Module, x: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(decode(mean + std * noise), mean, logvar) of a Gaussian-posterior autoencoder (Kingma & Welling 2014)."""
    mean, logvar = vae.encode(x)
    z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
    return vae.decode(z), mean, logvar


class KLAutoencoder(nn.Module):
    """diffusers AutoencoderKL; forward(x, noise) -> (reconstruction, posterior mean, posterior logvar).

    Downsampling factor 2**(len(block_out_channels)-1); the latent has ``latent_channels``.
    The posterior sample z = mean + std * noise (reparameterisation) takes its noise from the
    caller (the objective draws it, so that the draws are the same whatever the process layout).
    """

    def __init__(self, in_channels: int, block_out_channels: list[int], latent_channels: int,
                 layers_per_block: int = 1, norm_num_groups: int = 32, sample_size: int = 32,
                 mid_attention: bool = False):
        super().__init__()
        from diffusers import AutoencoderKL

        self.model = AutoencoderKL(force_upcast=False, **_diffusers_args(
            in_channels, block_out_channels, latent_channels, layers_per_block, norm_num_groups, sample_size,
            mid_attention))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dist_ = self.model.encode(x).latent_dist
        return dist_.mean, dist_.logvar                      # (B, c, h, w) each, logvar clamped to [-30, 20]

    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z).sample

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """noise (B, *latent_shape) ~ N(0, I) for the posterior sample; None decodes the posterior mean."""
        return reparameterised(self, x, noise)

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        f = 2 ** (len(self.model.config.block_out_channels) - 1)
        return (self.model.config.latent_channels, image_size // f, image_size // f)


class MLPVAE(nn.Module):
    """The seed's VAE for 2-D data: MLP encoder to (mean, logvar), MLP decoder."""

    def __init__(self, dim: int = 2, latent_dim: int = 2, hidden: int = 128):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * latent_dim))
        self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))
        self.latent_dim = latent_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.enc(x).chunk(2, dim=-1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z: Tensor) -> Tensor:
        return self.dec(z)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """noise (B, *latent_shape) ~ N(0, I) for the posterior sample; None decodes the posterior mean."""
        return reparameterised(self, x, noise)

    def latent_shape(self, image_size: int = 0) -> tuple[int, ...]:
        return (self.latent_dim,)


class VQAutoencoder(nn.Module):
    """diffusers VQModel with gentrain's own quantisation step (van den Oord et al. 2017).

    forward(x) -> (reconstruction, z_e, z_q, indices): z_e the encoder output, z_q its nearest
    codebook vectors (gradient flows to the codebook through z_q), the decoder sees the
    straight-through z_e + sg(z_q - z_e), so its gradient reaches the encoder unchanged.
    The codebook is VQModel's ``quantize.embedding`` so an export quantises identically.
    Options (training-time statistics, like BatchNorm's): EMA codebook updates (the codebook is
    then not trained by the optimizer) and dead-code restart from encoder outputs.
    """

    def __init__(self, in_channels: int, block_out_channels: list[int], latent_channels: int, num_codes: int,
                 layers_per_block: int = 1, norm_num_groups: int = 32, sample_size: int = 32,
                 ema_codebook: bool = False, ema_decay: float = 0.99, dead_code_restart: bool = True,
                 restart_threshold: float = 1e-3, mid_attention: bool = False):
        super().__init__()
        from diffusers import VQModel

        self.model = VQModel(num_vq_embeddings=num_codes, vq_embed_dim=latent_channels, **_diffusers_args(
            in_channels, block_out_channels, latent_channels, layers_per_block, norm_num_groups, sample_size,
            mid_attention))
        self.num_codes, self.ema_codebook, self.ema_decay = num_codes, ema_codebook, ema_decay
        self.dead_code_restart, self.restart_threshold = dead_code_restart, restart_threshold
        book = self.codebook
        nn.init.uniform_(book, -1.0 / num_codes, 1.0 / num_codes)
        if ema_codebook:
            book.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", book.detach().clone())
        self.register_buffer("usage", torch.ones(num_codes))  # EMA of how often each code is picked

    @property
    def codebook(self) -> nn.Parameter:
        return self.model.quantize.embedding.weight          # (K, D)

    def encode(self, x: Tensor) -> Tensor:
        return self.model.encode(x).latents                  # (B, D, h, w), before quantisation

    def quantize(self, z_e: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest codebook vectors (B, D, h, w) and their indices (B, h, w)."""
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)        # (B*h*w, D)
        book = self.codebook
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(1)[None]
        idx = dist2.argmin(1)
        z_q = book[idx].view(b, h, w, d).permute(0, 3, 1, 2)
        return z_q, idx.view(b, h, w)

    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z, force_not_quantize=True).sample

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        f = 2 ** (len(self.model.config.block_out_channels) - 1)
        return (self.model.config.latent_channels, image_size // f, image_size // f)

    def decode_indices(self, idx: Tensor) -> Tensor:
        return self.decode(self.codebook[idx].permute(0, 3, 1, 2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        z_e = self.encode(x)
        z_q, idx = self.quantize(z_e)
        if self.training:
            self._update_statistics(z_e.detach(), idx)
        z_st = z_e + (z_q - z_e).detach()                    # straight-through estimator
        return self.decode(z_st), z_e, z_q, idx

    @torch.no_grad()
    def _update_statistics(self, z_e: Tensor, idx: Tensor) -> None:
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1]).float()
        onehot = torch.zeros(flat.shape[0], self.num_codes, device=flat.device)
        onehot.scatter_(1, idx.reshape(-1, 1), 1.0)
        counts, sums = onehot.sum(0), onehot.t() @ flat       # (K,), (K, D)
        sum_(counts), sum_(sums)                              # same statistics on every rank
        self.usage.mul_(self.ema_decay).add_(counts / counts.sum(), alpha=1 - self.ema_decay)
        if self.ema_codebook:  # van den Oord et al. 2017, appendix A.1
            self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            n = self.ema_count.sum()
            count = (self.ema_count + 1e-5) / (n + self.num_codes * 1e-5) * n   # Laplace smoothing
            self.codebook.data.copy_(self.ema_sum / count[:, None])
        if self.dead_code_restart:
            dead = self.usage < self.restart_threshold / self.num_codes
            if dead.any():  # re-seed unused codes from this step's encoder outputs
                fresh = global_rows(flat, int(dead.sum()))
                self.codebook.data[dead] = fresh.to(self.codebook.dtype)
                self.usage[dead] = 1.0 / self.num_codes
                if self.ema_codebook:
                    self.ema_sum[dead] = fresh
                    self.ema_count[dead] = 1.0
