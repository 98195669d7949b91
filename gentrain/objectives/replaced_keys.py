"""train.* keys that do nothing for a family, because its phases carry their own optimizer settings
(`OptimizerSpec` fields that are not None win over train.*). Setting one of them to anything but its
default is refused in one line naming the keys that apply, rather than accepted silently."""
from __future__ import annotations

from typing import Any

from gentrain.errors import GentrainError

_GAN = {f"train.{k}": f"model.g_optimizer.{k} and model.d_optimizer.{k}" for k in ("lr", "betas", "weight_decay")}
_IMAGE2IMAGE = {
    "train.lr": "model.lr",
    "train.betas": "model.betas",
    "train.weight_decay": "none (Adam without weight decay, as in the papers)",
    "train.lr_schedule": "model.constant_steps (the lr held, then linear to 0)",
    "train.warmup_steps": "model.constant_steps (the lr held, then linear to 0)",
}
# family -> {train key: the keys that apply instead}
REPLACED_TRAIN_KEYS: dict[str, dict[str, str]] = {"gan": _GAN, "pix2pix": _IMAGE2IMAGE, "cyclegan": _IMAGE2IMAGE}


def check_train_keys_apply(cfg: Any, defaults: Any) -> None:
    """One line for a train.* key changed from its default (`defaults`: a TrainConfig()) where it does nothing."""
    t, family = cfg.train, cfg.model.family
    for key, instead in REPLACED_TRAIN_KEYS.get(family, {}).items():
        name = key.split(".", 1)[1]
        value, default = getattr(t, name), getattr(defaults, name)
        if (list(value) if isinstance(value, (list, tuple)) else value) != default:
            raise GentrainError(f"config key {key!r}: {value!r} does nothing in the {family} family (its phases have "
                                f"their own optimizers); what applies instead: {instead}")
    if t.ema_warmup != defaults.ema_warmup and t.ema_decay == 0:
        raise GentrainError("config key 'train.ema_warmup' does nothing without an EMA; set train.ema_decay > 0 too")
