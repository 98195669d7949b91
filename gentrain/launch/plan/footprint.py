"""What a memory plan is made of: a config's trained nets and frozen helpers, counted, and one
training micro-step, run for real on CPU while every live tensor storage is tracked.

Two ways to build it: the family's own objective when every frozen helper is a local folder (its
loss is measured: helpers' forward passes, noise, the net, the loss, backward), else, for a hub id
that is never downloaded here, the denoiser alone on inputs shaped by the helpers' configs (a local
folder, the Hugging Face cache, or the published configs of the ids the presets name), with the
helpers rebuilt from those configs (random weights) to measure their no-grad forward apart.
"""
from __future__ import annotations

import functools
import json
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gentrain.distributed.core import accelerate_autocast
from gentrain.errors import GentrainError

PERSISTENCE = 1e5         # DeepSpeed stage3_param_persistence_threshold default: smaller tensors stay whole
AUTO_SECOND_POINT_S = 15  # measure-batches auto: batches 2 and 4 only when batch 1 took less than this (s)


class LiveTensorMemory(TorchDispatchMode):
    """Bytes of the tensor storages created inside the context that are still alive, and their peak.

    CPU torch keeps no allocator statistics, so each op's output storages are recorded (one that
    is none of the op's inputs' storages is new; views and in-place results are not) and released
    by a weakref callback when freed: what ``torch.cuda.memory_allocated`` counts, less the caching
    allocator's rounding. Not seen: workspaces an op frees before returning, tensors made on other
    threads. Every birth and release is logged, so the peak can be recomputed without some storages
    (the grads, counted apart), with the casts of ``nn.Parameter``s (autocast's bf16 weight copies)
    live at that peak.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.events: list[tuple[int, int, bool]] = []             # (storage serial, +/- bytes, weight copy)
        self._born: dict[int, tuple[int, weakref.ref]] = {}        # storage address -> (serial, weakref)

    def _release(self, key: int, serial: int, nbytes: int, copy: bool, _ref: Any = None) -> None:
        self._born.pop(key, None)
        self.live -= nbytes
        self.events.append((serial, -nbytes, copy))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if _strided(t)}
        copy = func is torch.ops.aten._to_copy.default and isinstance(args[0], nn.Parameter)
        for t in tree_leaves(out):
            if not _strided(t):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in inputs or key in self._born:
                continue
            n, serial = st.nbytes(), len(self.events)
            self._born[key] = (serial, weakref.ref(st, functools.partial(self._release, key, serial, n, copy)))
            self.events.append((serial, n, copy))
            self.live += n
            self.peak = max(self.peak, self.live)
        return out

    def peak_without(self, tensors: list[torch.Tensor]) -> tuple[int, int]:
        """(peak live bytes had these live tensors' storages never been counted, weight copies live at it)."""
        skip = {self._born[k][0] for k in (t.untyped_storage()._cdata for t in tensors) if k in self._born}
        live = copies = peak = at_peak = 0
        for serial, n, copy in self.events:
            if serial in skip:
                continue
            live, copies = live + n, copies + (n if copy else 0)
            if live > peak:
                peak, at_peak = live, copies
        return peak, at_peak


def _strided(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


# ---- what is built: trained nets, frozen helpers, one micro-step to measure ------------------------
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


@dataclass
class Frozen:
    name: str
    cls: str
    params: int
    bytes: int
    source: str


def count_net(name: str, net: nn.Module, ema: bool) -> NetCount:
    ps = list(net.parameters())
    return NetCount(name, type(getattr(net, "model", net)).__name__, sum(p.numel() for p in ps),
                    sum(p.numel() for p in ps if p.requires_grad),
                    sum(b.numel() * b.element_size() for b in net.buffers()),
                    max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules()),
                    sum(p.numel() for p in ps if p.numel() < PERSISTENCE), ema)


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
    ema = set(obj.ema_nets) if cfg.train.ema_decay > 0 else set()
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
                           cls.net_name in cls.ema_nets and cfg.train.ema_decay > 0)
    built: dict[str, nn.Module] = {}

    def trained() -> list[nn.Module]:
        if not built:
            torch.manual_seed(cfg.train.seed)
            built["net"] = build_denoiser(m, space, cond).train()
            built.update({k: b().eval().requires_grad_(False) for k, b in builders.items()})
        return [built["net"]]

    def step(b: int) -> None:
        net = trained()[0]
        kw = ({"emb": torch.randn(b, m.latent.max_length, dim)} if kind == "text" else
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


# ---- activations: measured at small batches, scaled linearly ----------------------------------------
@dataclass
class Series:
    """Peak bytes measured at a few batch sizes; a line through the last two (or one point) scales them."""
    batch_sizes: list[int]
    peaks: list[int]
    fixed_floor: int = 0      # one point: the part known not to grow with the batch

    @property
    def per_sample(self) -> float:
        if len(self.batch_sizes) == 1:
            return max(0.0, (self.peaks[0] - self.fixed_floor) / self.batch_sizes[0])
        (b0, b1), (m0, m1) = self.batch_sizes[-2:], self.peaks[-2:]
        return max(0.0, (m1 - m0) / (b1 - b0))

    @property
    def fixed(self) -> float:
        if len(self.batch_sizes) == 1:
            return float(self.fixed_floor)
        return max(0.0, self.peaks[-1] - self.per_sample * self.batch_sizes[-1])

    def at(self, batch: int) -> int:
        return int(self.fixed + self.per_sample * batch)


@dataclass
class Activations:
    step: Series                  # the micro-step's live peak, its grads left out (the grads row has them)
    weight_copies: int            # autocast's casts of parameters live at that peak (largest batch), bytes
    seconds: float
    encode: Optional[Series] = None   # the frozen helpers' no-grad forward, when measured apart

    def at(self, batch: int, less_weight_copies: bool = False) -> int:
        """Activation bytes at a batch: the larger of the step's and the helpers' forward."""
        step = self.step.at(batch) - (self.weight_copies if less_weight_copies else 0)
        return max(step, self.encode.at(batch) if self.encode else 0)

    def describe(self) -> list[str]:
        """How each series was measured and scaled, one line each."""
        def line(x: Series, fixed: str) -> str:
            at = f"at batch {', '.join(map(str, x.batch_sizes))}"
            how = (f"line through {x.batch_sizes[-2]} and {x.batch_sizes[-1]}" if len(x.batch_sizes) > 1 else
                   f"one point, {fixed}, the rest proportional to the batch" if fixed else
                   "one point, proportional to the batch")
            return f"{at}, {how}: {x.fixed / 2**20:.1f} MiB + {x.per_sample / 2**20:.3f} MiB/sample"

        out = [f"micro-step {line(self.step, 'fixed part = autocast weight copies live at the peak')}"]
        if self.encode:
            out.append(f"frozen helpers' no-grad forward (uncached batches) {line(self.encode, '')}; "
                       "the larger of the two counts")
        return out


def _series(run: Callable[[int], None], sizes: list[int], auto: bool, after: Callable[[LiveTensorMemory], tuple[int, int]],
            ) -> tuple[Series, int]:
    """Peaks of run(b) at each size (auto: stop after the first if it was slow), and the last weight copies."""
    peaks, copies, t0 = [], 0, time.perf_counter()
    for i, b in enumerate(sizes):
        if auto and i == 1 and time.perf_counter() - t0 > AUTO_SECOND_POINT_S:
            sizes = sizes[:1]
            break
        with LiveTensorMemory() as mem:
            run(b)
        peak, copies = after(mem)
        peaks.append(peak)
    return Series(list(sizes), peaks, copies if len(sizes) == 1 else 0), copies


def measure_activations(model: Model, batch_sizes: Optional[list[int]], warmup: bool = True) -> Activations:
    """Peak live tensor bytes of one micro-step (batch, forward, loss, backward), its grads left out
    (the grads row counts them), at each batch size; the last two fix a line. None = auto: batch 1,
    then 2 and 4 unless batch 1 took over AUTO_SECOND_POINT_S (kernels at batch 1 can differ: the
    line through 1 and 2 overshot the one through 32 and 64 by 7% on a UNet here)."""
    sizes, auto = list(batch_sizes or [1, 2, 4]), batch_sizes is None
    model.trained()   # built (and initialised) before anything is tracked: weights are no activations
    if warmup:   # lazy state (cached "" embedding, preview batch) must not count as the first batch's
        model.step(sizes[0])
        model.zero_grad()
    t0 = time.perf_counter()

    def without_grads(mem: LiveTensorMemory) -> tuple[int, int]:
        out = mem.peak_without(model.grads())
        model.zero_grad()
        return out

    step, copies = _series(model.step, sizes, auto, without_grads)
    encode = _series(model.encode, step.batch_sizes, False, lambda mem: (mem.peak, 0))[0] if model.encode else None
    return Activations(step, copies, time.perf_counter() - t0, encode)
