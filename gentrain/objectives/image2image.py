"""Image-to-image GANs: Pix2Pix (Isola et al. 2017, paired) and CycleGAN (Zhu et al. 2017, unpaired).

Pix2Pix: U-Net G maps the input to the target; a PatchGAN D judges the channel-concatenated
(input, output) pair. G: GAN + l1_weight * L1(G(x), y) (100 in the paper); D: its loss halved, as
the paper does. model.gan_weight=0 trains the L1-only U-Net (the paper's ablation), one phase.

CycleGAN: G_ab, G_ba (ResNet generators), D_a, D_b (PatchGANs), least-squares loss,
cycle weight 10, identity weight 0.5 x 10; each D sees fakes through a 50-image history pool
(Shrivastava et al. 2017) whose contents are saved in every checkpoint. As in the reference code,
one optimizer updates both generators and one both discriminators, generators first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from gentrain.errors import GentrainError
from gentrain.maths.gan_losses import d_loss, g_loss
from gentrain.objectives.base import Objective, OptimizerSpec, Phase
from gentrain.objectives.conditioning import ImageInput

PAIRED_LOSSES = ("nonsaturating", "lsgan")


@dataclass
class Pix2PixConfig:
    family: str = "pix2pix"
    loss: str = "nonsaturating"      # nonsaturating (the paper's BCE) | lsgan
    base_channels: int = 32          # U-Net width
    dropout: float = 0.5             # on the innermost decoder layers (the paper's noise)
    d_base_channels: int = 32
    d_layers: int = 2                # PatchGAN stride-2 layers (receptive field grows with them)
    d_norm: str = "batch"
    l1_weight: float = 100.0
    gan_weight: float = 1.0          # 0: the L1-only U-Net ablation (no discriminator)
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    constant_steps: int = -1         # lr held this long, then linear to 0 (-1: half of train.max_steps)

    def validate(self, cfg: Any) -> None:
        _check_image2image(self, cfg, "input")


@dataclass
class CycleGANConfig:
    family: str = "cyclegan"
    base_channels: int = 32
    n_blocks: int = 6
    n_down: int = 2
    d_base_channels: int = 32
    d_layers: int = 2
    d_norm: str = "instance"
    loss: str = "lsgan"
    cycle_weight: float = 10.0
    identity_weight: float = 0.5     # times cycle_weight, as in the paper
    pool_size: int = 50
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    constant_steps: int = -1         # -1: half of train.max_steps (the paper's 100 + 100 epochs)

    def validate(self, cfg: Any) -> None:
        _check_image2image(self, cfg, "image_b")


def _check_image2image(m: Any, cfg: Any, member: str) -> None:
    if m.loss not in PAIRED_LOSSES:
        raise GentrainError(f"config key 'model.loss': {m.loss!r} is not allowed; choose one of {', '.join(PAIRED_LOSSES)}")
    if m.d_norm not in ("batch", "instance", "group", "none"):
        raise GentrainError(f"config key 'model.d_norm': {m.d_norm!r} is not allowed; choose one of batch, instance, group, none")
    if cfg.data.source != "shards":
        raise GentrainError(f"config key 'data.source': {m.family} trains on shards whose samples hold two images "
                            f"(`gentrain data build --source {'edges2digits' if member == 'input' else 'digits_inverted'}`)")
    if cfg.data.image_size / 2 ** m.d_layers < 3:
        raise GentrainError(f"config key 'model.d_layers': {m.d_layers} stride-2 layers leave less than 3 px of a "
                            f"{cfg.data.image_size}-px image")
    if m.constant_steps >= cfg.train.max_steps:
        raise GentrainError(f"config key 'model.constant_steps': {m.constant_steps} must be below train.max_steps")
    m.constant_steps = cfg.train.max_steps // 2 if m.constant_steps < 0 else m.constant_steps


def _spec(m: Any) -> OptimizerSpec:
    return OptimizerSpec(name="adam", lr=m.lr, betas=tuple(m.betas), weight_decay=0.0, schedule="constant_then_linear",
                         constant_steps=m.constant_steps)


def _half_d_loss(name: str, real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * d_loss(name, real, fake)


def _require(batch: dict[str, Any], key: str, family: str) -> Tensor:
    if key not in batch:
        raise GentrainError(f"a {family} batch needs `{key}` (a second image in each sample); this one has "
                            f"{sorted(k for k in batch if not k.startswith('_'))}")
    return batch[key]


class Pix2PixObjective(Objective):
    Config = Pix2PixConfig
    ema_nets = ("gen",)
    paired_image = "input"
    evaluates = ("translation",)
    conditioning = ImageInput()   # the CLI takes --input, eval translates held-out inputs
    exports_folder = True

    def __init__(self, m: Pix2PixConfig, gen: torch.nn.Module, disc: torch.nn.Module | None):
        self.m, self.data_key = m, "image"
        self.nets = {"gen": gen} if disc is None else {"gen": gen, "disc": disc}
        self._preview_batch: dict[str, Tensor] | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "Pix2PixObjective":
        from gentrain.modeling.discriminators import PatchGAN
        from gentrain.modeling.gan.image2image import UNetGenerator

        m, c = cfg.model, cfg.data.channels
        gen = UNetGenerator(in_channels=c, out_channels=c, base=m.base_channels, image_size=cfg.data.image_size,
                            dropout=m.dropout)
        disc = PatchGAN(2 * c, m.d_base_channels, m.d_layers, m.d_norm) if m.gan_weight > 0 else None
        return cls(m, gen, disc)

    def phases(self) -> list[Phase]:
        out = [Phase("gen", ("gen",), optimizer=_spec(self.m))]
        if "disc" in self.nets:
            out.insert(0, Phase("disc", ("disc",), optimizer=_spec(self.m)))
        return out

    def loss(self, phase: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        x, y = _require(batch, self.paired_image, "pix2pix"), batch["image"]
        if self._preview_batch is None:
            self._preview_batch = {"input": x[:8].detach().clone(), "image": y[:8].detach().clone()}
        if phase == "disc":
            with torch.no_grad():
                fake = self.nets["gen"](x)
            d_real = self.nets["disc"](torch.cat([x, y], 1))
            d_fake = self.nets["disc"](torch.cat([x, fake], 1))
            return _half_d_loss(self.m.loss, d_real, d_fake), {"gan/d_real_logit": d_real.detach().mean(),
                                                                 "gan/d_fake_logit": d_fake.detach().mean()}
        fake = self.nets["gen"](x)
        l1 = F.l1_loss(fake.float(), y.float())
        loss, logs = self.m.l1_weight * l1, {"pix2pix/l1": l1.detach()}
        if "disc" in self.nets:
            g = g_loss(self.m.loss, self.nets["disc"](torch.cat([x, fake], 1)))
            loss = loss + self.m.gan_weight * g
            logs["gan/g_loss"] = g.detach()
        return loss, logs

    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, *, generator: torch.Generator | None = None,
               **kw: Any) -> Tensor:
        """G(input) for cond={"input": (n, C, H, W) in [-1, 1]}."""
        x = (cond or {}).get("input")
        if x is None or len(x) != n:
            raise GentrainError(f"pix2pix translates images: pass cond={{'input': ({n}, C, H, W) images}} (--input)")
        return self.nets["gen"](x.to(self.device))

    @torch.no_grad()
    def preview(self, generator: torch.Generator | None = None) -> Tensor:
        b = self._preview_batch
        if b is None:
            raise GentrainError("pix2pix previews the first training batch; none was seen yet")
        self.preview_nrow = b["input"].shape[0]   # rows: inputs, outputs, targets
        return torch.cat([b["input"], self.sample(self.preview_nrow, {"input": b["input"]}), b["image"]])

    def export(self, out: Path, cfg: Any, batches: Iterator[dict]) -> dict[str, Any]:
        gen = self.nets["gen"]
        gen.save_pretrained(str(Path(out) / "generator"), safe_serialization=True)
        return {"generator_class": f"{type(gen).__module__}.{type(gen).__name__}"}


class CycleGANObjective(Objective):
    Config = CycleGANConfig
    ema_nets = ("gen_ab", "gen_ba")
    paired_image = "image_b"
    evaluates = ("cycle",)
    conditioning = ImageInput()
    exports_folder = True

    def __init__(self, m: CycleGANConfig, gens: tuple[torch.nn.Module, torch.nn.Module],
                 discs: tuple[torch.nn.Module, torch.nn.Module]):
        from gentrain.objectives.image_pool import ImagePool

        self.m, self.data_key = m, "image"
        self.nets = {"gen_ab": gens[0], "gen_ba": gens[1], "disc_a": discs[0], "disc_b": discs[1]}
        self.pools = {"a": ImagePool(m.pool_size), "b": ImagePool(m.pool_size)}
        self._preview_batch: dict[str, Tensor] | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "CycleGANObjective":
        from gentrain.modeling.discriminators import PatchGAN
        from gentrain.modeling.gan.image2image import ResnetGenerator

        m, c = cfg.model, cfg.data.channels

        def gen() -> torch.nn.Module:
            return ResnetGenerator(in_channels=c, out_channels=c, base=m.base_channels, n_blocks=m.n_blocks,
                                   n_down=m.n_down)

        def disc() -> torch.nn.Module:
            return PatchGAN(c, m.d_base_channels, m.d_layers, m.d_norm)

        return cls(m, (gen(), gen()), (disc(), disc()))

    def phases(self) -> list[Phase]:
        return [Phase("gen", ("gen_ab", "gen_ba"), optimizer=_spec(self.m)),
                Phase("disc", ("disc_a", "disc_b"), optimizer=_spec(self.m))]

    def loss(self, phase: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        a, b = batch["image"], _require(batch, self.paired_image, "cyclegan")
        if self._preview_batch is None:
            self._preview_batch = {"a": a[:8].detach().clone(), "b": b[:8].detach().clone()}
        n = self.nets
        if phase == "disc":
            with torch.no_grad():
                fake_b, fake_a = n["gen_ab"](a), n["gen_ba"](b)
            rand = lambda k: self.rng.rand(k, device=a.device)  # noqa: E731 - the training stream's draws
            fake_b = self.pools["b"].query(fake_b, rand)
            fake_a = self.pools["a"].query(fake_a, rand)
            loss_a = _half_d_loss(self.m.loss, n["disc_a"](a), n["disc_a"](fake_a))
            loss_b = _half_d_loss(self.m.loss, n["disc_b"](b), n["disc_b"](fake_b))
            return loss_a + loss_b, {"cycle/d_a": loss_a.detach(), "cycle/d_b": loss_b.detach()}
        fake_b, fake_a = n["gen_ab"](a), n["gen_ba"](b)
        adv = g_loss(self.m.loss, n["disc_b"](fake_b)) + g_loss(self.m.loss, n["disc_a"](fake_a))
        cycle = F.l1_loss(n["gen_ba"](fake_b).float(), a.float()) + F.l1_loss(n["gen_ab"](fake_a).float(), b.float())
        loss = adv + self.m.cycle_weight * cycle
        logs = {"cycle/g_adv": adv.detach(), "cycle/cycle_l1": cycle.detach()}
        if self.m.identity_weight > 0:
            ident = F.l1_loss(n["gen_ab"](b).float(), b.float()) + F.l1_loss(n["gen_ba"](a).float(), a.float())
            loss = loss + self.m.identity_weight * self.m.cycle_weight * ident
            logs["cycle/identity_l1"] = ident.detach()
        return loss, logs

    def state_dict(self) -> dict[str, Tensor]:
        return {f"pool_{k}.{name}": v for k, pool in self.pools.items() for name, v in pool.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, pool in self.pools.items():
            prefix = f"pool_{k}."
            pool.load_state_dict({name[len(prefix):]: v for name, v in state.items() if name.startswith(prefix)})

    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, *, generator: torch.Generator | None = None,
               direction: str = "ab", **kw: Any) -> Tensor:
        """G_ab(input) (direction "ab") or G_ba(input) ("ba") for cond={"input": (n, C, H, W)}."""
        x = (cond or {}).get("input")
        if x is None or len(x) != n:
            raise GentrainError(f"cyclegan translates images: pass cond={{'input': ({n}, C, H, W) images}} (--input)")
        if direction not in ("ab", "ba"):
            raise GentrainError(f"cyclegan direction {direction!r}: choose ab or ba")
        return self.nets[f"gen_{direction}"](x.to(self.device))

    @torch.no_grad()
    def preview(self, generator: torch.Generator | None = None) -> Tensor:
        p = self._preview_batch
        if p is None:
            raise GentrainError("cyclegan previews the first training batch; none was seen yet")
        k = p["a"].shape[0]
        self.preview_nrow = k   # rows: A, A->B, A->B->A, B, B->A, B->A->B
        ab = self.nets["gen_ab"](p["a"])
        ba = self.nets["gen_ba"](p["b"])
        return torch.cat([p["a"], ab, self.nets["gen_ba"](ab), p["b"], ba, self.nets["gen_ab"](ba)])

    def export(self, out: Path, cfg: Any, batches: Iterator[dict]) -> dict[str, Any]:
        for name in ("gen_ab", "gen_ba"):
            self.nets[name].save_pretrained(str(Path(out) / name.replace("gen", "generator")), safe_serialization=True)
        return {"generator_class": f"{type(self.nets['gen_ab']).__module__}.{type(self.nets['gen_ab']).__name__}"}
