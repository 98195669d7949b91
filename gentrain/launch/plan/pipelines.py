"""What a fine-tune's memory plan is made of (family ``finetune``): the pretrained pipeline's parts,
counted on the meta device from their configs -- never loaded, nothing downloaded.

The configs come from ``model.pretrained``: a local pipeline folder (its ``model_index.json`` and
each part's ``config.json``), else the published configs gentrain ships for the hub ids its presets
name (``pipeline_configs/``, sources in its README), else the local Hugging Face cache.

Full fine-tune: the denoiser (UNet or transformer) is the trained net (fp32 weights, grads, AdamW,
EMA as ``memory.py`` counts them); the VAE and text encoders are frozen, in the run's mixed precision.
LoRA (``model.lora.rank`` > 0): the denoiser's base is frozen in the mixed precision and the trained
net is its peft adapters (fp32, with their AdamW state), put on the meta-built denoiser with the
config's rank and targets (default: the adapter's); ``model.text_encoder_lora`` adds adapters on the
text encoders the class's adapter names (those its ``load_lora_weights`` accepts; never SD3's T5). A frozen
base inside a trained net is partitioned by ZeRO-3 / FSDP2 with it (``Frozen.sharded``). Activations
are not measured: a 2.6-8B denoiser is never run on this machine's CPU (the plan's activation row is
0; see the note).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from gentrain.errors import GentrainError
from gentrain.launch.plan.footprint import PERSISTENCE, Frozen, Model, count_frozen, count_net

CONFIG_DIR = Path(__file__).parent / "pipeline_configs"   # published configs of the presets' hub ids
FROZEN_PARTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")   # held frozen unless adapted


def shipped_ids() -> list[str]:
    return sorted(p.name.replace("--", "/") for p in CONFIG_DIR.iterdir() if (p / "model_index.json").is_file())


def _cached(name: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(name, "model_index.json")
    except Exception:   # not a repo id at all
        return None
    return Path(path).parent if isinstance(path, str) else None


def pipeline_folder(name: str) -> tuple[Path, str]:
    """The folder whose model_index.json and part configs the plan reads, and what it is."""
    from gentrain.modeling.pretrained import check_pretrained

    check_pretrained(name, "model.pretrained")
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise GentrainError(f"config key 'model.pretrained': {name!r} has no model_index.json, so it is not a "
                                "diffusers pipeline folder")
        return p, "config of the local folder"
    shipped = CONFIG_DIR / name.replace("/", "--")
    if (shipped / "model_index.json").is_file():
        return shipped, "its published config, shipped with gentrain, not loaded"
    if (cached := _cached(name)) is not None:
        return cached, "config in the local Hugging Face cache, not loaded"
    raise GentrainError(f"config key 'model.pretrained': {name!r} is neither a local pipeline folder nor a hub id whose "
                        f"configs gentrain ships ({', '.join(shipped_ids())}) or the local Hugging Face cache holds; the "
                        "plan needs its configs: pass a local diffusers pipeline folder")


def part_builder(folder: Path, index: dict, part: str) -> Callable[[], nn.Module]:
    """A builder of one pipeline part (random weights) from its config.json, by model_index.json's class."""
    import diffusers
    import transformers

    library, cls_name = index[part]
    path = folder / part / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GentrainError(f"config key 'model.pretrained': cannot read {path} ({str(e).splitlines()[0]}); the plan "
                            "counts each part from its config") from None
    if library == "diffusers" and hasattr(diffusers, cls_name):
        cls = getattr(diffusers, cls_name)
        return lambda: cls.from_config(raw)
    if library == "transformers" and hasattr(transformers, cls_name):
        cls = getattr(transformers, cls_name)
        return lambda: cls(cls.config_class.from_dict(raw))
    raise GentrainError(f"config key 'model.pretrained': {folder / 'model_index.json'} names {part} as {library}."
                        f"{cls_name}, which the installed libraries do not have")


def _cast(module: nn.Module, dtype: torch.dtype, trained_only: bool = False) -> nn.Module:
    """Floating parameters and buffers to `dtype` in place (as ``.to(dtype)``, without diffusers' warning)."""
    tensors = [p for p in module.parameters() if p.requires_grad or not trained_only]
    for t in tensors + ([] if trained_only else list(module.buffers())):
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    return module


def _adapters(name: str, net: nn.Module, ema: bool, source: str) -> tuple[Any, Frozen]:
    """A net with peft adapters: the trained adapters as the net, the base as a frozen part sharded with it."""
    whole = count_net(name, net, ema)
    base = [p for p in net.parameters() if not p.requires_grad]
    trained = [p for p in net.parameters() if p.requires_grad]
    adapters = replace(whole, params=whole.trained, buffer_bytes=0,
                       persistent=sum(p.numel() for p in trained if p.numel() < PERSISTENCE))
    frozen = Frozen(f"{name} (frozen base)", whole.cls, sum(p.numel() for p in base),
                    sum(p.numel() * p.element_size() for p in base) + whole.buffer_bytes, source, sharded=True)
    return adapters, frozen


def adapter_facts(index: dict, where: str) -> tuple[str, tuple[str, ...], list[str], tuple[str, ...]]:
    """(the part that trains, the encoders model.text_encoder_lora adapts, model.lora's default targets, the parts
    a run on cached shards never loads), as the class's pipeline adapter says (objectives/adapters); a class no
    adapter serves is its one-line refusal."""
    from gentrain.objectives.adapters import adapter_for

    a = adapter_for(index.get("_class_name"), where)
    return a.denoiser, tuple(a.lora_text_encoders), list(a.denoiser_targets), tuple(a.cache_unloaded)


def _loaded_encoder_notes(index: dict, frozen: list[Frozen], kept: tuple[str, ...]) -> list[str]:
    """A note for each text encoder of 1B+ params a cached run still loads (not in the adapter's cache_unloaded:
    e.g. Sana's Gemma, through which its pipeline encodes the previews' prompts): no column drops it."""
    return [f"{f.name} ({f.cls}, {f.params / 1e9:.2f}B params, {f.bytes / 2**30:.2f} GiB) stays loaded on cached "
            f"embeddings too ({index.get('_class_name')} encodes the previews' prompts with it): in every column "
            "with or without `gentrain data cache`" for f in frozen
            if f.name.startswith("text_encoder") and f.name not in kept and f.params >= 1e9 and f.cls != "T5EncoderModel"]


def pipeline_model(cfg: Any) -> Model:
    """The plan's Model of a fine-tune, counted from the pipeline's configs on the meta device."""
    from gentrain.objectives.lora import add_lora, text_encoder_targets

    m, t = cfg.model, cfg.train
    folder, source = pipeline_folder(m.pretrained)
    index = json.loads((folder / "model_index.json").read_text())
    denoiser, lora_encoders, targets, unloaded = adapter_facts(index, m.pretrained)
    if m.text_encoder_lora.rank and not lora_encoders:   # as the run refuses it (adapters/base.py)
        raise GentrainError(f"config key 'model.text_encoder_lora.rank': {index.get('_class_name')}'s load_lora_weights "
                            f"takes {denoiser} adapters only; set model.text_encoder_lora.rank=0")
    if denoiser not in index:
        raise GentrainError(f"config key 'model.pretrained': {folder / 'model_index.json'} names no {denoiser}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision, torch.float32)
    ema, nets, frozen, notes = t.ema == "posthoc" or t.ema_decay > 0, [], [], []   # either EMA kind
    with torch.device("meta"):
        net = part_builder(folder, index, denoiser)()
        if m.lora.rank:
            add_lora(_cast(net, dtype), m.lora, targets, "lora")
            _cast(net, torch.float32, trained_only=True)   # adapters fp32 (diffusers' cast_training_params)
            nets_, base = _adapters(denoiser, net, ema, source)
            nets.append(nets_)
            frozen.append(base)
        else:
            nets.append(count_net(denoiser, net, ema))
        for part in FROZEN_PARTS:
            if not (isinstance(index.get(part), list) and index[part][0]):
                continue
            module = _cast(part_builder(folder, index, part)(), dtype)
            if m.text_encoder_lora.rank and part in lora_encoders:
                add_lora(module, m.text_encoder_lora, text_encoder_targets(module), "text_encoder_lora")
                _cast(module, torch.float32, trained_only=True)
                trained, base = _adapters(part, module, ema, source)
                nets.append(trained)
                frozen.append(base)
            else:
                frozen.append(count_frozen(part, module, source))
    for f in (f for f in frozen if f.name in unloaded):   # cached.py: a run on cached encodings never loads them
        notes.append(f"{f.name} ({f.cls}, {f.params / 1e9:.2f}B params, {f.bytes / 2**30:.2f} GiB) only encodes "
                     f"captions: trained on cached embeddings (`gentrain data cache --pretrained {m.pretrained}`) it "
                     f"can stay unloaded, {f.bytes / 2**30:.2f} GiB less per GPU in every column (the 'encoders "
                     "cached' row)")
    notes.extend(_loaded_encoder_notes(index, frozen, unloaded))
    notes.append("activations not measured: the pipeline's parts are counted from their configs on the meta device "
                 "and never run here, so the activations row is 0; add the denoiser's activations at your batch and "
                 "resolution (gradient checkpointing keeps them small)")
    return Model(nets, [tuple(n.name for n in nets)], frozen, notes, lambda b: None, lambda: [], "configs",
                 uncached_bytes=sum(f.bytes for f in frozen if f.name in unloaded))
