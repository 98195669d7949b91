"""Fine-tuning an existing text-to-image pipeline, a hub id or folder whose model_index.json names a class a
pipeline adapter serves (adapters/: StableDiffusionPipeline, StableDiffusionXLPipeline, ...; gentrain's own
text-to-image exports are StableDiffusionPipeline folders). The adapter loads it with `from_pretrained`; its
denoiser (UNet or transformer) trains in full or through LoRA / DoRA adapters (peft), optionally with adapters
on the text encoders the class's `load_lora_weights` accepts. This module never names a model: it asks the adapter.

The maths follows the pipeline's own scheduler: a VP scheduler (DDPM/DDIM/PNDM/Euler configs: betas, T, epsilon
or v_prediction) trains as the `diffusion` family does (min-SNR, noise offset); a flow scheduler (`use_flow_sigmas`,
flow_prediction, or a FlowMatch* class) as `flow` does. Caption dropout trains on the pipeline's "" embedding. Previews
and eval draw through the stock pipeline with its scheduler at the base's guidance (pipeline_defaults.py). On shards
cached for the pipeline (`gentrain data cache --pretrained`, adapters/cached.py) the encodings come from the shards.

A LoRA run's checkpoints hold the adapters (and their optimizer state) only; the frozen base is rebuilt from
`model.pretrained`. Its export is `pytorch_lora_weights.safetensors` in diffusers' format with the peft config
(so `lora_alpha` survives) for `pipe.load_lora_weights(dir)` (the class's save_lora_weights), a kohya file for
A1111/ComfyUI where the class has one, and on request the fused full pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from gentrain.errors import GentrainError
from gentrain.maths.rng import BatchRNG, untouched_rng
from gentrain.maths.schedules import VPSchedule
from gentrain.objectives.adapters import load_adapter, needs_size_crop
from gentrain.objectives.adapters.base import PipelineAdapter, TrainableTextEncoder
from gentrain.objectives.adapters.cached import cached_inputs, pipeline_cache
from gentrain.objectives.base import OptimizerSpec, Phase
from gentrain.objectives.diffusion import PREDICTIONS, DiffusionObjective
from gentrain.objectives.flow import FlowMatchingObjective
from gentrain.objectives.flow_weighting import ScheduledFlowLoss, check_weighting
from gentrain.objectives.lora import (CLIP_TARGETS, KOHYA_FILE, LORA_FILE, LoraSpec, add_lora, save_kohya,
                                      set_adapters, text_encoder_targets)
from gentrain.objectives.pipeline_defaults import base_guidance
from gentrain.objectives.prior import PriorMixin, PriorSpec, check_prior


@dataclass
class FinetuneConfig:
    family: str = "finetune"
    pretrained: str = ""               # hub id or folder of a diffusers pipeline an adapter serves (adapters/)
    revision: Optional[str] = None
    prediction_type: str = "auto"      # auto: the scheduler's; epsilon | v_prediction overrides a VP scheduler's
    min_snr_gamma: float = 0.0         # VP schedulers; 0 = off
    noise_offset: float = 0.0          # VP schedulers
    time_sampling: str = "uniform"     # flow schedulers but FlowMatchEuler: uniform | logit_normal
    # FlowMatchEulerDiscreteScheduler pipelines (SD3): the density of u and the loss weighting
    # (diffusers.training_utils), defaults of diffusers' examples/dreambooth/train_dreambooth_sd3.py and
    # train_dreambooth_lora_sd3.py (--weighting_scheme, --logit_mean, --logit_std, --mode_scale)
    weighting_scheme: str = "logit_normal"   # logit_normal | mode (shape u) | sigma_sqrt | cosmap (weight) | none
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    train_guidance: float = 3.5        # FLUX.1-dev's guidance embedding in training: the Flux script's --guidance_scale
    lora: LoraSpec = field(default_factory=LoraSpec)
    text_encoder_lora: LoraSpec = field(default_factory=LoraSpec)
    cfg_dropout: float = 0.1           # caption dropout: each caption trains as "" (zeros where the class guides so)
    prior: PriorSpec = field(default_factory=PriorSpec)   # DreamBooth prior preservation (prior.py); off by default
    guidance_scale: Optional[float] = None  # previews and eval; null: the base's (pipeline_defaults.py)
    sample_steps: int = 25             # previews and eval, through the pipeline's scheduler
    validation_prompts: list[str] = field(default_factory=list)  # previews (default: 4 held-out captions)
    validation_samples: int = 64       # held-out images for the validation loss (fixed timesteps and noise)
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"           # adamw | adamw8bit (bitsandbytes; torch AdamW with one line when it does not import)
    export_kohya: bool = True          # LoRA export: also the kohya-format file (not for DoRA)
    export_fused: bool = False         # LoRA export: also the full pipeline with the adapters merged, in fused/

    def validate(self, cfg: Any) -> None:
        if not self.pretrained:
            raise GentrainError("config key 'model.pretrained' is required: a hub id or folder of a diffusers "
                                "pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, ...)")
        if self.guidance_scale is None:
            self.guidance_scale = base_guidance(self.pretrained, self.revision)
        if needs_size_crop(self.pretrained, self.revision):   # before a resumed run's config is compared
            cfg.data.size_crop = True
        if cfg.data.source != "shards":
            raise GentrainError("config key 'data.source': fine-tuning reads image-caption shards (data.source=shards)")
        if self.prediction_type not in ("auto", "epsilon", "v_prediction"):
            raise GentrainError(f"config key 'model.prediction_type': {self.prediction_type!r} is not allowed; choose "
                                "one of auto, epsilon, v_prediction")
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise GentrainError(f"config key 'model.time_sampling': {self.time_sampling!r} is not allowed; choose one "
                                "of uniform, logit_normal")
        check_weighting(self)
        check_prior(cfg)
        for key in ("lora", "text_encoder_lora"):
            spec = getattr(self, key)
            if spec.rank < 0 or not 0 <= spec.dropout < 1 or (spec.alpha is not None and spec.alpha <= 0):
                raise GentrainError(f"config key 'model.{key}': rank must be >= 0, dropout in [0, 1), alpha > 0")
        if self.text_encoder_lora.rank and not self.lora.rank:
            raise GentrainError("config key 'model.text_encoder_lora.rank': text-encoder adapters go with UNet "
                                "adapters (set model.lora.rank too)")
        if not 0 <= self.cfg_dropout < 1:
            raise GentrainError(f"config key 'model.cfg_dropout': {self.cfg_dropout} must be in [0, 1)")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise GentrainError(f"config key 'model.optimizer': {self.optimizer!r} is not allowed; choose adamw or adamw8bit")
        if self.sample_steps < 1 or self.validation_samples < 1:
            raise GentrainError("config keys 'model.sample_steps' and 'model.validation_samples' must be >= 1")


class PipelineConditioning:
    """A fine-tune's conditioning as eval and the CLI see it (text); the pipeline's text encoders move with it."""
    kind, dim, text_encoder = "text", 0, None

    def __init__(self, encoders: list[nn.Module]):
        self.encoders = encoders

    def to(self, device: torch.device) -> "PipelineConditioning":
        for e in self.encoders:
            e.to(device)
        return self


class FinetuneMixin:
    """What a fine-tune adds to the diffusion / flow maths: the pretrained parts (through the pipeline's
    adapter), LoRA adapters, the stock pipeline for samples, validation, and the exports."""

    preview_at_start = True     # the base model's grid, rendered before the first step
    evaluates = ("validation_loss", "digits")

    def __init__(self, net: nn.Module, m: Any, *, adapter: PipelineAdapter, **kw: Any):
        self.net_name, self.adapter = adapter.denoiser, adapter
        super().__init__(net, m, **kw)

    @classmethod
    def build(cls, adapter: PipelineAdapter, m: FinetuneConfig, cfg: Any) -> "FinetuneMixin":
        from diffusers.training_utils import cast_training_params

        parts, d = adapter.parts, cfg.data
        net = parts[adapter.denoiser]
        # Under mixed precision the frozen weights are held in it (VAE, text encoders, and a LoRA run's
        # denoiser base), as diffusers' training scripts do; trained weights (a full net, adapters) stay fp32.
        frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32)
        parts["vae"].to(frozen_dtype)
        encoders = [parts[n].to(frozen_dtype).eval().requires_grad_(False) for n in adapter.text_encoders
                    if parts.get(n) is not None]
        space = adapter.latent_space(d.image_size, d.channels)   # checked against the data and the net (latent.py)
        if m.lora.rank:
            net.to(frozen_dtype)
            add_lora(net, m.lora, adapter.denoiser_targets, "lora")
            cast_training_params(net, torch.float32)
        if m.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        obj = cls(adapter.wrap(net.train()), m, adapter=adapter, space=space, conditioning=PipelineConditioning(encoders),
                  cfg_dropout=m.cfg_dropout, guidance_scale=m.guidance_scale)
        if m.text_encoder_lora.rank:
            for name in adapter.lora_text_encoders:
                te = parts[name]
                add_lora(te, m.text_encoder_lora, adapter.encoder_lora_targets(name, te), "text_encoder_lora")
                cast_training_params(te, torch.float32)
                obj.nets[name] = TrainableTextEncoder(te.train())
        obj.cfg, obj.lora = cfg, m.lora.rank > 0
        obj.ema_nets = tuple(obj.nets)   # the denoiser, then the trained encoders
        obj.partial_nets = obj.ema_nets if obj.lora else ()
        obj._base_preview, obj._val, obj._uncond, obj.cached = None, None, None, None
        return obj

    def to(self, device: torch.device) -> "FinetuneMixin":
        self._uncond = None
        return super().to(device)

    def phases(self) -> list[Phase]:
        return [Phase("main", tuple(self.nets), optimizer=OptimizerSpec(name=self.m.optimizer))]

    # -- training inputs --------------------------------------------------------------------------
    def encode(self, captions: list[str]) -> dict[str, Tensor]:
        """The denoiser's text kwargs for `captions` (fp32); trained encoders run through their nets, with grads."""
        def call(name: str, *args: Any, **kw: Any) -> Any:
            if name in self.nets:
                return self.nets[name](*args, **kw)
            with torch.no_grad():
                return self.adapter.parts[name](*args, **kw)
        return {k: v.float() for k, v in self.adapter.encode(captions, call).items()}

    def uncond(self) -> dict[str, Tensor]:
        """What a dropped caption conditions on: the encoding of "" (frozen encoders: kept), or zeros."""
        if self._uncond is None:
            with torch.no_grad():
                self._uncond = self.encode([""])
            if self.adapter.zero_uncond():
                self._uncond = {k: torch.zeros_like(v) for k, v in self._uncond.items()}
        return self._uncond

    def inputs(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Latents and the denoiser's kwargs: the captions' encoding, each dropped with prob. model.cfg_dropout
        (to the "" encoding, or zeros where the pipeline guides against zeros), and the adapter's extras."""
        if self.cached is not None:   # cached shards (adapters/cached.py): the encodings are in the batch
            return cached_inputs(self, batch)
        if "txt" not in batch:
            raise GentrainError("a fine-tune encodes captions with the pipeline's text encoders: use shards with txt")
        x0 = self.space.latents(batch, self.rng)
        captions = list(batch["txt"])
        drop = self.rng.rand(len(captions), device=x0.device) < self.cfg_dropout if self.cfg_dropout > 0 else None
        trained = any(n in self.nets for n in self.adapter.text_encoders)
        if trained and drop is not None:   # the trained encoders see the "" they are dropped to
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        cond = self.encode(captions)
        if drop is not None and (not trained or self.adapter.zero_uncond()):
            un = self.uncond()
            cond = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), un[k].to(v.dtype).expand_as(v), v)
                    for k, v in cond.items()}
        return x0, {**cond, **self.adapter.extras(batch, x0)}

    # -- the stock pipeline -----------------------------------------------------------------------
    def pipeline(self) -> Any:
        """The stock pipeline on the base's parts with the current nets (weights as now) in place."""
        return self.adapter.pipeline(**{n: getattr(net, "model", net) for n, net in self.nets.items()})

    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, *, generator: torch.Generator | None = None,
               steps: int | None = None, guidance_scale: float | None = None, **kw: Any) -> Tensor:
        """n images in [-1, 1] drawn by the stock pipeline (its scheduler), cond={"prompts": [n strings]}."""
        prompts = (cond or {}).get("prompts")
        if prompts is None or len(prompts) != n:
            raise GentrainError(f"a text-to-image model needs cond={{'prompts': [{n} prompts]}}")
        size, scale = self.cfg.data.image_size, self.guidance_scale if guidance_scale is None else guidance_scale
        out = self.pipeline()(height=size, width=size, generator=generator, num_inference_steps=steps or
                              self.m.sample_steps, output_type="pt", **self.adapter.call_kwargs(list(prompts), scale)).images
        return out.to(self.device) * 2 - 1

    def _adapters(self, enabled: bool) -> None:
        for name in self.partial_nets:
            set_adapters(self.nets[name], enabled)

    @torch.no_grad()
    def preview(self, generator: torch.Generator | None = None) -> Tensor:
        """Two rows: the base model's images (adapters off, or the grid rendered before training),
        then the current model's, for the validation prompts (else the first 4 held-out captions), one seed."""
        prompts = list(self.m.validation_prompts) or [c for b in self.held_out() for c in b.get("txt", [])][:4] or [""]
        state = generator.get_state() if generator is not None else None
        now = self.sample(len(prompts), {"prompts": prompts}, generator=generator)
        if self._base_preview is None or self._base_preview.shape != now.shape:
            if self.lora:
                self._adapters(False)
                if state is not None:
                    generator.set_state(state)
                try:
                    self._base_preview = self.sample(len(prompts), {"prompts": prompts}, generator=generator)
                finally:
                    self._adapters(True)
            elif self.step == 0:
                self._base_preview = now
        self.preview_nrow, self.preview_captions = len(prompts), prompts
        if self._base_preview is None:   # a full fine-tune resumed without its base grid
            return now
        return torch.cat([self._base_preview.to(now.device), now])

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self._base_preview is None else {"base_preview": self._base_preview}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._base_preview = state.get("base_preview")

    # -- validation loss on fixed (timestep, noise) pairs -----------------------------------------
    def held_out(self) -> list[dict[str, Any]]:
        """`model.validation_samples` held-out samples (eval.shards, else the training shards), read once."""
        if self._val is None:
            from gentrain.eval.heldout import heldout_batches
            cfg = replace(self.cfg, eval=replace(self.cfg.eval, num_samples=self.m.validation_samples))
            with untouched_rng():   # read first at step 0 straight, later resumed: the training draws must not move
                self._val = list(heldout_batches(cfg, batch_size=self.m.validation_samples))
        return self._val

    @torch.no_grad()
    def validation(self) -> dict[str, float]:
        """The training loss on `model.validation_samples` held-out images (eval.shards, else the
        training shards) with timesteps and noise drawn once from eval.seed: comparable across steps
        and runs. No caption dropout."""
        runtime, dropout = self.runtime, self.cfg_dropout
        g = torch.Generator(self.device).manual_seed(self.cfg.eval.seed)
        total, count = 0.0, 0
        try:
            self.bind(replace(runtime, rng=BatchRNG(generator=g)))
            self.cfg_dropout = 0.0
            for batch in self.held_out():
                batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                n = len(batch["key"])
                total, count = total + float(self.loss("main", batch)[0]) * n, count + n
        finally:
            self.bind(runtime)
            self.cfg_dropout = dropout
        return {"val/loss": total / max(count, 1)}

    # -- export -----------------------------------------------------------------------------------
    def export(self, out: Path, cfg: Any, batches: Any = None) -> dict[str, Any]:
        pipe, scheduler = self.pipeline(), self.adapter.parts["scheduler"]
        info: dict[str, Any] = {"pretrained": self.m.pretrained, "pipeline_class": self.adapter.pipeline_class,
                                "scheduler": type(scheduler).__name__, "prediction": self.adapter.kind(),
                                "guidance_scale": self.guidance_scale}
        if not self.lora:
            pipe.save_pretrained(str(out), safe_serialization=True)
            return {**info, "diffusers_class": type(pipe).__name__, "kind": "full"}
        layers, meta = self.lora_layers()
        self.adapter.save_lora(out, layers, meta)
        info.update(kind="lora", lora_file=LORA_FILE, rank=self.m.lora.rank, alpha=self.m.lora.alpha or self.m.lora.rank)
        if self.m.export_kohya:
            problem = self.kohya_problem()
            if problem:
                info["kohya_skipped"] = problem
            else:
                save_kohya(layers, meta, out / KOHYA_FILE, self.adapter.kohya_prefixes)
                info["kohya_file"] = KOHYA_FILE
        if self.m.export_fused:
            fused = out / "fused"
            pipe.fuse_lora(components=list(layers), lora_scale=1.0)
            pipe.unload_lora_weights()
            pipe.save_pretrained(str(fused), safe_serialization=True)
            info["fused"] = "fused"
        return info

    def lora_layers(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict]]:
        """Each adapted model's adapter weights in diffusers' key format, and its peft config (alpha)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers, meta = {}, {}
        for name in self.partial_nets:
            net = self.nets[name]
            model = getattr(net, "model", net)
            layers[name] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
            meta[name] = model.peft_config["default"].to_dict()
        return layers, meta

    def kohya_problem(self) -> Optional[str]:
        if not self.adapter.kohya_prefixes:
            return f"{self.adapter.pipeline_class}: no kohya format (use the diffusers file)"
        if self.m.lora.use_dora or self.m.text_encoder_lora.use_dora:
            return "DoRA: the kohya format has no magnitude vectors that diffusers' loader keeps (dora_scale is dropped)"
        if any(text_encoder_targets(self.nets[n].model) != CLIP_TARGETS
               for n in self.partial_nets if n in self.adapter.text_encoders):
            return "kohya's text-encoder keys name CLIP modules; this text encoder is not CLIP"
        return None


class DiffusionFinetune(PriorMixin, FinetuneMixin, DiffusionObjective):
    pass


class FlowFinetune(PriorMixin, FinetuneMixin, ScheduledFlowLoss, FlowMatchingObjective):
    pass


class FinetuneObjective:
    """The `finetune` family: its config, and the diffusion or flow objective its pipeline's scheduler asks for."""

    Config = FinetuneConfig

    @classmethod
    def from_config(cls, cfg: Any) -> FinetuneMixin:
        from types import SimpleNamespace

        m, cached = cfg.model, pipeline_cache(cfg)   # cached encodings: the adapter's cache_unloaded stay unloaded
        adapter = load_adapter(m, unload_cached=cached is not None)
        if adapter.size_conditioning:   # the reader puts each image's original size and crop in its batch
            cfg.data.size_crop = True    # (validate set it already where the class was known offline)
        kind, scheduler = adapter.kind(), adapter.parts["scheduler"]
        if kind == "flow":
            if int(scheduler.config.get("num_train_timesteps", 1000)) != 1000:
                raise GentrainError("config key 'model.pretrained': the flow scheduler's num_train_timesteps must be "
                                    "1000 (the UNet is called with t * 1000)")
            if m.prediction_type != "auto":
                raise GentrainError(f"config key 'model.prediction_type': {m.prediction_type!r} cannot override a "
                                    "flow pipeline's velocity target (use auto)")
            maths = SimpleNamespace(**{**vars(m), "sampler": "pipeline"})
            obj = FlowFinetune.build(adapter, maths, cfg)
            if adapter.training_sigmas() is not None:   # the scripts' FlowMatchEuler grid (SD3: shifted; Sana)
                obj.use_scheduler_sigmas(adapter.training_sigmas())
            obj.cached = cached
            obj.setup_prior(cfg)
            return obj
        prediction = kind if m.prediction_type == "auto" else m.prediction_type
        if prediction not in PREDICTIONS:
            raise GentrainError(f"config key 'model.pretrained': the scheduler's prediction_type {prediction!r} is not "
                                f"one of {', '.join(PREDICTIONS)}")
        if prediction != kind:   # the export's scheduler samples with what was trained
            scheduler.register_to_config(prediction_type=prediction)
        maths = SimpleNamespace(**{**vars(m), "prediction_type": prediction, "sampler": "pipeline",
                                   "beta_schedule": "linear",
                                   "num_train_timesteps": int(scheduler.config.num_train_timesteps)})
        obj = DiffusionFinetune.build(adapter, maths, cfg)
        obj.schedule = VPSchedule(scheduler_config=scheduler.config)
        obj.cached = cached
        obj.setup_prior(cfg)
        return obj
