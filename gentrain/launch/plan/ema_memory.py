"""The EMA's part of a memory plan, by kind (``train.ema``; gentrain/train/ema.py).

fixed (``train.ema_decay`` > 0): diffusers' EMAModel, one fp32 copy of each EMA net's parameters on
every rank's share (whole under DDP and ZeRO-1/2, /D under ZeRO-3 and FSDP2); its foreach step
makes a difference tensor as scratch (4 bytes per trained EMA param, same share).

posthoc: one fp32 copy per stored profile (``train.posthoc_sigma_rels``, two by default) on the same
share, each updated by an in-place lerp (no scratch); every ``train.posthoc_snapshot_every`` steps and
at ``train.max_steps`` all profiles are written whole, with the nets' buffers, to
RUN/ema_snapshots/step_N.safetensors, which ``train.keep_last`` never prunes: disk, not GPU memory.
"""
from __future__ import annotations

from typing import Any

GIB = 2 ** 30


def keeps_ema(t: Any) -> bool:
    """Whether the trained nets' EMA exists at all (either kind)."""
    return t.ema == "posthoc" or t.ema_decay > 0


def posthoc_profiles(t: Any) -> int:
    """fp32 copies a posthoc EMA keeps per EMA'd parameter (0: the fixed EMA, or none)."""
    return len(t.posthoc_sigma_rels) if t.ema == "posthoc" else 0


def ema_counts(model: Any) -> tuple[float, float]:
    """(fp32 EMA elements held, elements of the EMA step's scratch), unsharded: the strategies
    divide them by D where they shard the EMA."""
    E = sum(n.params for n in model.nets if n.ema)
    E_t = sum(n.trained for n in model.nets if n.ema)
    k = getattr(model, "posthoc_profiles", 0)
    return (k * E, 0) if k else (E, E_t)


def snapshots(t: Any, model: Any) -> dict[str, int]:
    """Disk of the posthoc EMA's snapshots: count over the run, bytes each (every profile whole, fp32,
    + the EMA nets' buffers), bytes in all."""
    k = posthoc_profiles(t)
    ema = [n for n in model.nets if n.ema]
    each = k * 4 * sum(n.params for n in ema) + sum(n.buffer_bytes for n in ema)
    count = t.max_steps // t.posthoc_snapshot_every + (1 if t.max_steps % t.posthoc_snapshot_every else 0)
    return {"count": count, "bytes_each": each, "bytes_total": count * each}


def posthoc_note(t: Any, model: Any) -> str:
    s = snapshots(t, model)
    size = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    return (f"train.ema=posthoc: {posthoc_profiles(t)} power-function profiles (sigma_rel "
            f"{', '.join(f'{x:g}' for x in t.posthoc_sigma_rels)}), so the EMA row holds "
            f"{posthoc_profiles(t)} fp32 copies of the EMA'd parameters (per rank's share), updated in place "
            f"(no EMA scratch); snapshots on disk (RUN/ema_snapshots, never pruned): {s['count']} x "
            f"{size(s['bytes_each'])} = {size(s['bytes_total'])} (every train.posthoc_snapshot_every="
            f"{t.posthoc_snapshot_every} of {t.max_steps} steps)")
