"""What a memory plan is made of: a config's trained nets and frozen helpers, counted, and one
training micro-step to measure (``activations`` runs it on CPU, tracking every live tensor storage).

Two ways to build it: the family's own objective when every frozen helper is a local folder (its
loss is measured: helpers' forward passes, noise, the net, the loss, backward), else, for a hub id
that is never downloaded here, the denoiser alone on inputs shaped by the helpers' configs (a local
folder, the Hugging Face cache, or the published configs of the ids the presets name), with the
helpers rebuilt from those configs (random weights) to measure their no-grad forward apart.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gentrain.distributed.core import accelerate_autocast
from gentrain.errors import GentrainError
from gentrain.launch.plan.ema_memory import keeps_ema

PERSISTENCE = 1e5         # DeepSpeed stage3_param_persistence_threshold default: smaller tensors stay whole


@dataclass
class NetCount:
    name: str
    cls: str
    params: int            # all parameters of the net
    trained: int           # those with requires_grad
    buffer_bytes: int
    largest_module: int    # parameters of the largest single module (ZeRO-3 gathers module by module)
    persistent: int        # parameters in tensors under the ZeRO-3 persistence threshold
    ema: bool
    fsdp_root: int = 0     # FSDP2: parameters outside the net's blocks (gathered with the root, whole net's life)
    fsdp_block: int = 0    # FSDP2: parameters of the largest block (fully_shard unit: gathered one at a time)


@dataclass
class Frozen:
    name: str
    cls: str
    params: int
    bytes: int
    source: str
    sharded: bool = False   # a LoRA's frozen base inside a trained net: ZeRO-3 / FSDP2 partition it with the net


def count_net(name: str, net: nn.Module, ema: bool) -> NetCount:
    from gentrain.distributed.fsdp2 import blocks   # the FSDP2 backend's own units

    ps, units = list(net.parameters()), blocks(net)
    in_blocks = {id(p) for b in units for p in b.parameters()}
    return NetCount(name, type(getattr(net, "model", net)).__name__, sum(p.numel() for p in ps),
                    sum(p.numel() for p in ps if p.requires_grad),
                    sum(b.numel() * b.element_size() for b in net.buffers()),
                    max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules()),
                    sum(p.numel() for p in ps if p.numel() < PERSISTENCE), ema,
                    sum(p.numel() for p in ps if id(p) not in in_blocks),
                    max((sum(p.numel() for p in b.parameters()) for b in units), default=0))


def count_frozen(name: str, module: nn.Module, source: str) -> Frozen:
    ps = list(module.parameters()) + list(module.buffers())
    return Frozen(name, type(getattr(module, "model", module)).__name__, sum(p.numel() for p in module.parameters()),
                  sum(p.numel() * p.element_size() for p in ps), source)


@dataclass
class Model:
    nets: list[NetCount]
    phases: list[tuple[str, ...]]          # trained nets of each phase (one optimizer each)
    frozen: list[Frozen]
    notes: list[str]
    step: Callable[[int], None]                  # one micro-step's forward + backward at a batch size
    trained: Callable[[], list[nn.Module]]       # the real nets that step trains (built on first use)
    path: str                                    # "objective" (its loss) or "denoiser" (the net alone)
    encode: Optional[Callable[[int], None]] = None   # "denoiser": the frozen helpers' no-grad forward apart
    posthoc_profiles: int = 0    # train.ema=posthoc: fp32 EMA copies per EMA'd param (ema_memory.py); 0: fixed

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for net in self.trained() for p in net.parameters() if p.grad is not None]

    def zero_grad(self) -> None:
        for net in self.trained():
            net.zero_grad(set_to_none=True)


def _frozen_modules(objective: Any) -> dict[str, nn.Module]:
    """Modules the objective holds beside its trained nets (autoencoder, text encoder), two levels deep."""
    trained = {id(m) for net in objective.nets.values() for m in net.modules()}
    found: dict[str, nn.Module] = {}

    def visit(obj: Any, prefix: str, depth: int) -> None:
        for k, v in vars(obj).items():
            if isinstance(v, nn.Module):
                if id(v) not in trained and all(v is not f for f in found.values()):
                    found[prefix + k] = v
            elif depth < 2 and hasattr(v, "__dict__") and not isinstance(v, (torch.Tensor, type)):
                visit(v, f"{prefix}{k}.", depth + 1)
    visit(objective, "", 0)
    return found


def synthetic_batch(cfg: Any, b: int, paired_image: str | None = None) -> dict[str, Any]:
    """A batch as the data pipeline serves it: 2-D points, or images + captions + labels (uncached),
    with the family's second image under `paired_image` (Pix2Pix's input, CycleGAN's image_b)."""
    g = torch.Generator().manual_seed(b)
    if cfg.data.source == "toy2d":
        return {"x": torch.randn(b, 2, generator=g)}
    d = cfg.data
    image = lambda: torch.rand(b, d.channels, d.image_size, d.image_size, generator=g) * 2 - 1  # noqa: E731
    batch = {"image": image(), "txt": ["a handwritten digit seven"] * b, "key": [f"{i:06d}" for i in range(b)],
             "label": torch.zeros(b, dtype=torch.long)}
    if paired_image:
        batch[paired_image] = image()
    return batch


def _objective_model(cfg: Any) -> Model:
    """The family's own objective (every frozen helper is a local folder): its loss is what's measured."""
    from gentrain.objectives import build_objective

    torch.manual_seed(cfg.train.seed)
    obj = build_objective(cfg)
    phases = obj.phases()
    obj.step = max(ph.start for ph in phases)       # every phase and term active (e.g. a GAN term's start)
    ema = set(obj.ema_nets) if keeps_ema(cfg.train) else set()
    nets = [count_net(n, net, n in ema) for n, net in obj.nets.items()]
    frozen = [count_frozen(k, m, "loaded as the trainer loads it") for k, m in _frozen_modules(obj).items()]

    def step(b: int) -> None:
        for ph in phases:
            for net in obj.nets.values():
                net.train()
            with accelerate_autocast([obj.nets[n] for n in ph.nets], cfg.train.mixed_precision):
                loss, _ = obj.loss(ph.name, synthetic_batch(cfg, b, obj.paired_image))
                loss.backward()
            del loss

    return Model(nets, [ph.nets for ph in phases], frozen, [], step, lambda: list(obj.nets.values()), "objective")


# Published configs of the hub ids the shipped presets name, for planning offline (not loaded):
# counting them gives the well-known sizes, 83,653,863 and 123,060,480 parameters (tested).
PUBLISHED = {
    "stabilityai/sd-vae-ft-mse": ("AutoencoderKL", dict(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
        sample_size=256, act_fn="silu")),
    "openai/clip-vit-large-patch14": ("clip_text_model", dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)),
}


def _hub_config(name: str) -> Optional[dict]:
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(name, "config.json")
    except Exception:   # not a repo id at all (e.g. a missing local path)
        return None
    return json.loads(Path(path).read_text()) if isinstance(path, str) else None


def _autoencoder(name: str) -> tuple[Callable[[], nn.Module], str]:
    """A builder of the frozen autoencoder from its config (a folder, the HF cache, a published config,
    or ``exports/PRESET`` not exported yet: that preset's model) and where the config came from."""
    import diffusers

    from gentrain.config import list_presets, load_config

    config, source, p = None, "", Path(name)
    if p.is_dir():
        config, source = diffusers.AutoencoderKL.load_config(name), "config of the local folder"
    elif (config := _hub_config(name)) is not None:
        source = "config in the local Hugging Face cache, not loaded"
    elif name in PUBLISHED:
        config, source = {"_class_name": PUBLISHED[name][0], **PUBLISHED[name][1]}, "its published config, not loaded"
    elif p.parent.name == "exports" and p.name in list_presets():
        from gentrain.objectives import build_objective

        preset = load_config(p.name)
        if preset.model.family not in ("vae", "vqvae"):
            raise GentrainError(f"config key 'model.latent.autoencoder': preset {p.name!r} is not an autoencoder")
        return (lambda: build_objective(preset).nets["ae"].model,
                f"{name} not exported yet: preset {p.name}'s model, which its export will hold")
    if config is None:
        raise GentrainError(f"config key 'model.latent.autoencoder': {name!r} is neither a local folder nor a cached or "
                            "known hub id; the plan needs its config (latent channels, downsampling): pass a local "
                            "diffusers folder, e.g. model.latent.autoencoder=exports/vae_digits")
    cls = diffusers.VQModel if config.get("_class_name") == "VQModel" else diffusers.AutoencoderKL
    return lambda: cls.from_config(config), source


def _text_encoder(name: str) -> tuple[Callable[[], nn.Module], str]:
    """A builder of the frozen text encoder from its config (the class FrozenTextEncoder would load)."""
    from transformers import AutoConfig, AutoModel, CLIPTextConfig, CLIPTextModel, T5EncoderModel

    from gentrain.modeling.text_encoders import resolve_text_encoder_path

    path = resolve_text_encoder_path(name)
    if Path(path).is_dir():
        config, source = AutoConfig.from_pretrained(path), "config of the local folder"
    elif (raw := _hub_config(name)) is not None:
        config, source = AutoConfig.for_model(**raw), "config in the local Hugging Face cache, not loaded"
    elif name in PUBLISHED:
        config, source = CLIPTextConfig(**PUBLISHED[name][1]), "its published config, not loaded"
    else:
        raise GentrainError(f"config key 'model.latent.text_encoder': {name!r} is neither a local folder nor a cached or "
                            "known hub id; the plan needs its config (embedding width): pass a local folder")
    if getattr(config, "text_config", None) is not None and config.model_type == "clip":
        config = config.text_config
    cls = {"clip": CLIPTextModel, "clip_text_model": CLIPTextModel, "t5": T5EncoderModel}.get(config.model_type)
    return (lambda: cls(config) if cls else AutoModel.from_config(config)), source


def _denoiser_model(cfg: Any) -> Model:
    """A frozen helper is a hub id (never downloaded here): the denoiser alone, its inputs shaped by the
    helpers' configs, and the helpers rebuilt from those configs (random weights) for their no-grad
    forward on an uncached batch (``encode``), measured apart."""
    from gentrain.objectives import family_class
    from gentrain.objectives.denoising import build_denoiser

    m, d = cfg.model, cfg.data
    cls, builders, frozen = family_class(m.family), {}, []
    c, factor, dim = d.channels, 1, 0
    for key, name, find in (("space.vae", m.latent.autoencoder, _autoencoder),
                            ("conditioning.text_encoder", m.latent.text_encoder, _text_encoder)):
        if name:
            builders[key], source = find(name)
            with torch.device("meta"):
                helper = builders[key]()
            frozen.append(count_frozen(key, helper, source))
            if key == "space.vae":
                c, factor = int(helper.config.latent_channels), 2 ** (len(helper.config.block_out_channels) - 1)
            else:
                dim, vocab = int(helper.config.hidden_size), int(helper.config.vocab_size)
    kind = "text" if m.latent.text_encoder else "class" if m.latent.num_classes else "none"
    s = d.image_size // factor
    space, cond = SimpleNamespace(latent_channels=c, latent_size=lambda: s), SimpleNamespace(kind=kind, dim=dim)
    with torch.device("meta"):
        counts = count_net(cls.net_name, build_denoiser(m, space, cond),
                           cls.net_name in cls.ema_nets and keeps_ema(cfg.train))
    built: dict[str, nn.Module] = {}

    def trained() -> list[nn.Module]:
        if not built:
            torch.manual_seed(cfg.train.seed)
            built["net"] = build_denoiser(m, space, cond).train()
            built.update({k: b().eval().requires_grad_(False) for k, b in builders.items()})
        return [built["net"]]

    def step(b: int) -> None:
        net = trained()[0]
        kw = ({"emb": torch.randn(b, m.latent.max_length, dim), "mask": torch.ones(b, m.latent.max_length, dtype=torch.long),
               "pooled": torch.randn(b, dim)} if kind == "text" else
              {"labels": torch.zeros(b, dtype=torch.long)} if kind == "class" else {})
        with accelerate_autocast([net], cfg.train.mixed_precision):
            pred = net(torch.randn(b, c, s, s), torch.rand(b) * 1000, **kw)
            loss = F.mse_loss(pred.float(), torch.randn(pred.shape))
            del pred
            loss.backward()

    @torch.no_grad()
    def encode(b: int) -> None:   # what LatentSpace.latents and TextConditioning.text run on image batches
        trained()
        if "space.vae" in built:
            post = built["space.vae"].encode(torch.rand(b, d.channels, d.image_size, d.image_size) * 2 - 1).latent_dist
            del post
        if "conditioning.text_encoder" in built:
            built["conditioning.text_encoder"](torch.randint(0, vocab, (b, m.latent.max_length)))

    return Model([counts], [(cls.net_name,)], frozen, [], step, trained, "denoiser", encode if builders else None)


def build_model(cfg: Any) -> Model:
    """The objective when every frozen helper is a local folder (or the packaged MiniLM), else the denoiser."""
    from gentrain.modeling.text_encoders import DEFAULT_TEXT_ENCODER

    lat = getattr(cfg.model, "latent", None)
    helpers = [h for h in (getattr(lat, "autoencoder", None), getattr(lat, "text_encoder", None)) if h]
    local = all(Path(h).is_dir() or h == DEFAULT_TEXT_ENCODER for h in helpers)
    return _objective_model(cfg) if local else _denoiser_model(cfg)
