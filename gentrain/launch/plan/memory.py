"""Per-GPU memory plan of a training config: ``gentrain plan PRESET --gpus G --nodes N``.
DDP and ZeRO here; FSDP2 (with and without CPU offload) in ``fsdp2_memory``.

``accelerate estimate-memory`` counts weights, gradients and Adam state of one unsharded model.
This adds ZeRO sharding, the EMA, frozen helpers, communication buffers, the optimizer/EMA
step's scratch, and activations measured by a real forward + backward on CPU (``activations``;
the nets and frozen helpers are counted and built in ``footprint``).

Bytes per trained parameter on each GPU, D = G x N data-parallel ranks. The ZeRO paper's
accounting (Rajbhandari et al. 2020, sec. 3.1 and fig. 1): mixed-precision Adam holds 2 + 2 + K
bytes per parameter (16-bit weights, their grads, K = 12: fp32 master, momentum, variance);
P_os divides K by N_d, P_os+g the grads too, P_os+g+p all: 2 + 2 + 12/D, 2 + 14/D, 16/D.

                        weights   grads   fp32 master   Adam m, v   EMA (fp32)
    DDP, fp32 or amp    4         4       -             8           4      autocast keeps fp32 weights
    ZeRO-1   bf16       2         2       4/D           8/D         4
             fp32       4         4       4/D           8/D         4      the partition is cloned anyway
    ZeRO-2   bf16       2         2/D     4/D           8/D         4
             fp32       4         4/D     4/D           8/D         4
    ZeRO-3   bf16       2/D       2/D     4/D           8/D         4/D    gentrain shards the EMA too
             fp32       4/D       4/D     -             8/D         4/D    the partition is updated in place
    ZeRO-3 + offload    -         -       -             -           4/D    weights, master, Adam, fp32
                                                                           grads of the partition: host
(stage_1_and_2.py clones the fp32 partition; stage3.py ``_create_fp32_partitions`` reuses it when
the dtypes match.) Module buffers count with the weights; ZeRO-3 keeps tensors under
``stage3_param_persistence_threshold`` (1e5 elements) whole on every rank. Frozen helpers are
replicated, in the dtype gentrain loads them in; a LoRA's frozen base
(``pipelines.py``) is partitioned with its net under ZeRO-3 and FSDP2 (to the host under offload).

Buffers: DDP's gradient buckets, 4 bytes per trained param when D > 1 (the reducer copies grads
into flat buckets unless ``gradient_as_bucket_view``, which accelerate leaves False); DeepSpeed's
reduce bucket, ``reduce_bucket_size`` = 5e8 elements in the grad dtype, allocated whole at every
stage (``contiguous_gradients``); ZeRO-3 also gathers the largest module + the prefetch bucket (5e7).

Scratch (after backward, so never at the same time as activations): foreach AdamW's sqrt(v)
(4 bytes per trained param, DDP on CUDA), DeepSpeed's fp32 copy of the grad partition (4/D),
diffusers EMAModel's foreach difference (4 bytes per EMA param, /D under ZeRO-3).
With train.ema=posthoc the EMA column is one copy per stored profile, without the difference
(``ema_memory``).

    peak per GPU = weights + grads + Adam + master + EMA + frozen + buffers + max(activations, scratch)

Grads and activations are summed though backward frees activations as it allocates grads: an
upper bound (3-15% over a real Trainer step in tests/launch/test_plan.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from gentrain.errors import GentrainError
from gentrain.launch.plan.activations import Activations, measure_activations
from gentrain.launch.plan.ema_memory import ema_counts, posthoc_note, posthoc_profiles, snapshots
from gentrain.launch.plan.footprint import Model, build_model
from gentrain.launch.plan.fsdp2_memory import bytes_per_param_fsdp2, per_gpu_fsdp2
from gentrain.launch.plan.pipelines import pipeline_model

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp2", "fsdp2_offload")
TITLES = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3+offload",
          "fsdp2": "FSDP2", "fsdp2_offload": "FSDP2+offload*"}
UNSHARDED = ("ddp", "zero1", "zero2")
FORMULA_ONLY = ("fsdp2_offload",)   # cannot run without an accelerator: never checked against a measured step
ROWS = ("params", "grads", "optimizer", "master", "ema", "frozen", "buffers", "activations", "scratch")
LABELS = {"params": "params (+ buffers)", "grads": "grads", "optimizer": "optimizer (Adam m, v)",
          "master": "master (fp32)", "ema": "EMA (fp32)", "frozen": "frozen helpers", "buffers": "comm buffers",
          "activations": "activations", "scratch": "update scratch", "total": "total"}
REDUCE_BUCKET = 5e8       # DeepSpeed reduce_bucket_size default, elements
PREFETCH_BUCKET = 5e7     # stage3_prefetch_bucket_size default
GIB = 2 ** 30


# ---- the per-GPU accounting --------------------------------------------------------------------------
def per_gpu(model: Model, strategy: str, gpus: int, nodes: int, precision: str,
            act: Optional[Activations], batch: int) -> dict[str, float]:
    """Bytes per GPU of each row (see the module docstring), 'total', and 'host_per_node' for offload."""
    D, half, nets = gpus * nodes, precision in ("bf16", "fp16"), model.nets
    P, T = sum(n.params for n in nets), sum(n.trained for n in nets)            # all / trained params
    E, E_t = ema_counts(model)   # posthoc: one copy per profile, no scratch (ema_memory.py)
    buf, keep = sum(n.buffer_bytes for n in nets), sum(n.persistent for n in nets)
    by_name = {n.name: n for n in nets}
    T_phase = max(sum(by_name[k].trained for k in ph) for ph in model.phases)  # one optimizer's params
    a = act.at(batch) if act else 0
    if strategy.startswith("fsdp2"):   # fsdp2_memory.py
        r = per_gpu_fsdp2(model, strategy == "fsdp2_offload", gpus, nodes, precision, act, batch)
    elif strategy == "ddp":   # accelerate's autocast: fp32 weights, grads and Adam; bf16 only in activations
        r = dict(params=4 * P + buf, grads=4 * T, optimizer=8 * T, master=0, ema=4 * E,
                 buffers=4 * T if D > 1 else 0,                  # DDP's gradient buckets
                 activations=a, scratch=4 * max(T_phase, E_t))   # foreach AdamW's sqrt(v); EMA's difference
    else:
        stage = 3 if strategy.startswith("zero3") else int(strategy[-1])
        w, shard = (2 if half else 4), stage == 3               # weights and grads in the compute dtype
        largest = max(n.largest_module for n in nets)
        r = dict(params=w * (keep + (P - keep) / D if shard else P) + buf * w / 4,
                 grads=w * T / D if stage >= 2 else w * T, optimizer=8 * T / D,
                 master=4 * T / D if half or not shard else 0,  # fp32 ZeRO-3 updates its partition in place
                 ema=4 * E / D if shard else 4 * E,
                 buffers=w * REDUCE_BUCKET + (w * min(P, largest + PREFETCH_BUCKET) if shard else 0),
                 activations=act.at(batch, less_weight_copies=half) if act else 0,  # bf16 weights: no casts
                 scratch=max(4 * T / D, 4 * E_t / D if shard else 4 * E_t))  # fp32 grad partition; EMA's difference
        if strategy == "zero3_offload":   # partition's weights, fp32 master, Adam and fp32 grads on the host
            r["host_per_node"] = gpus * (w * (P - keep) + 16 * T) / D
            r.update(params=w * keep + buf * w / 4, grads=0, optimizer=0, master=0, scratch=4 * E_t / D)
    sharded = sum(f.bytes for f in model.frozen if f.sharded)   # a LoRA's base: partitioned with its net
    r["frozen"] = sum(f.bytes for f in model.frozen) - (0 if strategy in UNSHARDED else sharded * (1 - 1 / D))
    if strategy.endswith("offload"):   # the partition goes to the host with the net's
        r["frozen"] -= sharded / D
        r["host_per_node"] += gpus * sharded / D
    r["total"] = sum(r[k] for k in ROWS if k not in ("activations", "scratch")) + max(r["activations"], r["scratch"])
    return r


def bytes_per_param(precision: str) -> dict[str, str]:
    """The accounting above as text per column (per trained parameter; EMA per EMA'd parameter)."""
    return {**_bytes_per_param_zero(precision), **bytes_per_param_fsdp2()}


def _bytes_per_param_zero(precision: str) -> dict[str, str]:
    if precision in ("bf16", "fp16"):
        return {"ddp": "4 w + 4 g + 8 Adam (+4 DDP bucket) + 4 EMA = 16 (+4) + 4",
                "zero1": "2 w + 2 g + (4 master + 8 Adam)/D + 4 EMA", "zero2": "2 w + (2 g + 4 master + 8 Adam)/D + 4 EMA",
                "zero3": "(2 w + 2 g + 4 master + 8 Adam + 4 EMA)/D",
                "zero3_offload": "4 EMA/D on the GPU; (2 w + 4 master + 8 Adam + 4 fp32 g)/D in host memory"}
    return {"ddp": "4 w + 4 g + 8 Adam (+4 DDP bucket) + 4 EMA = 16 (+4) + 4",
            "zero1": "4 w + 4 g + (4 master copy + 8 Adam)/D + 4 EMA", "zero2": "4 w + (4 g + 4 master copy + 8 Adam)/D + 4 EMA",
            "zero3": "(4 w + 4 g + 8 Adam + 4 EMA)/D", "zero3_offload": "4 EMA/D on the GPU; (4 w + 4 master + 8 Adam + 4 g)/D in host memory"}


@dataclass
class Plan:
    config: str
    gpus: int
    nodes: int
    precision: str
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    gpu_memory: int
    margin: float
    model: Model
    activations: Optional[Activations]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    ema_snapshots: Optional[dict[str, int]] = None   # train.ema=posthoc: their disk (ema_memory.snapshots)

    @property
    def usable(self) -> float:
        return self.gpu_memory * (1 - self.margin)

    def fits(self, strategy: str, cached: bool = False) -> bool:
        """Whether the strategy's total fits; cached: without the parts a run on cached encodings never loads."""
        return self.rows[strategy]["total"] - (self.model.uncached_bytes if cached else 0) <= self.usable

    def to_json(self) -> dict[str, Any]:
        m, a = self.model, self.activations
        return {
            "config": self.config, "gpus": self.gpus, "nodes": self.nodes, "data_parallel": self.gpus * self.nodes,
            "precision": self.precision, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
            "gradient_checkpointing": self.gradient_checkpointing, "gpu_memory_bytes": self.gpu_memory,
            "margin": self.margin, "usable_bytes": int(self.usable),
            "nets": [asdict(n) for n in m.nets], "frozen": [asdict(f) for f in m.frozen],
            "activations": None if a is None else {
                "measured": m.path, "scaling": a.describe(), "seconds": a.seconds,
                "weight_copies_bytes": a.weight_copies, **{
                    f"{k}_{q}": v for k, x in (("step", a.step), ("encode", a.encode)) if x is not None
                    for q, v in (("batch_sizes", x.batch_sizes), ("peak_bytes", x.peaks),
                                 ("fixed_bytes", int(x.fixed)), ("per_sample_bytes", int(x.per_sample)))}},
            "strategies": {s: {"bytes": {k: int(v) for k, v in r.items()}, "fits": self.fits(s),
                               "fits_cached": self.fits(s, True),
                               "formula_only": s in FORMULA_ONLY}
                           for s, r in self.rows.items()},
            "bytes_per_param": bytes_per_param(self.precision), "ema_snapshots": self.ema_snapshots, "notes": m.notes,
        }


def make_plan(cfg: Any, gpus: int, nodes: int, *, gpu_memory: int = 80 * GIB, margin: float = 0.10,
              measure: Optional[list[int]] | bool = None) -> Plan:
    """The plan of a loaded config; measure: batch sizes, None = auto, False = no activation measurement."""
    t = cfg.train
    model = pipeline_model(cfg) if cfg.model.family == "finetune" else build_model(cfg)   # a fine-tune: its configs
    model.posthoc_profiles = posthoc_profiles(t)
    if model.posthoc_profiles:
        model.notes.append(posthoc_note(t, model))
    counted = model.path == "configs"   # a fine-tune's pipeline, counted from its configs (pipelines.py): never run
    act = None if measure is False or counted else measure_activations(model, measure or None, model.path == "objective")
    if act is None and not counted:
        model.notes.append("activations not measured (--no-measure): counted as 0")
    if t.mixed_precision == "fp16":
        model.notes.append("FSDP2 refuses train.mixed_precision=fp16 (no loss scaling): its columns are planned as bf16")
    plan = Plan(cfg.run.name, gpus, nodes, t.mixed_precision, t.batch_size, t.grad_accum,
                bool(getattr(cfg.model, "gradient_checkpointing", False)), gpu_memory, margin, model, act)
    plan.ema_snapshots = snapshots(t, model) if model.posthoc_profiles else None
    plan.rows = {s: per_gpu(model, s, gpus, nodes, t.mixed_precision, act, t.batch_size) for s in STRATEGIES}
    return plan


def _gib(x: float) -> str:
    return f"{x / GIB:.3f}" if x else "-"


def format_plan(plan: Plan) -> str:
    m, a, D = plan.model, plan.activations, plan.gpus * plan.nodes
    prec = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[plan.precision]
    lines = [f"gentrain plan {plan.config}: {plan.gpus} GPU(s) x {plan.nodes} node(s) = {D} data-parallel ranks, "
             f"{prec}, train.batch_size {plan.batch_size} per GPU per micro-step (grad_accum {plan.grad_accum})"
             + (", gradient checkpointing" if plan.gradient_checkpointing else "")]
    for n in m.nets:
        lines.append(f"  trained {n.name}: {n.cls}, {n.params / 1e6:,.2f}M params ({n.trained / 1e6:,.2f}M trained)"
                     + (", EMA kept" if n.ema else ""))
    for f in m.frozen:
        size = f"{f.bytes / GIB:.2f} GiB" if f.bytes >= GIB / 10 else f"{f.bytes / 2**20:.1f} MiB"
        lines.append(f"  frozen {f.name}: {f.cls}, {f.params / 1e6:,.2f}M params, {size} ({f.source})")
    width = 22
    head = f"{'GiB per GPU':<{width}}" + "".join(f"{TITLES[s]:>16}" for s in STRATEGIES)
    lines += ["", head, "-" * len(head)]
    for k in (*ROWS, "total"):
        lines.append(f"{LABELS[k]:<{width}}" + "".join(f"{_gib(plan.rows[s][k]):>16}" for s in STRATEGIES))
    usable = f"fits {plan.gpu_memory / GIB:.0f} GiB - {plan.margin:.0%}"
    lines.append(f"{usable:<{width}}" + "".join(f"{'yes' if plan.fits(s) else 'NO':>16}" for s in STRATEGIES))
    if plan.model.uncached_bytes:   # a fine-tune on cached encodings (`gentrain data cache --pretrained`)
        lines.append(f"{'  encoders cached':<{width}}" + "".join(f"{'yes' if plan.fits(s, True) else 'NO':>16}"
                                                                for s in STRATEGIES))
    host = {s: plan.rows[s]["host_per_node"] / GIB for s in ("zero3_offload", "fsdp2", "fsdp2_offload")}
    lines += ["", f"usable per GPU: {plan.usable / GIB:.1f} GiB ({plan.margin:.0%} kept for the CUDA context, "
                  f"cuDNN workspaces and fragmentation); host memory per node: ZeRO-3+offload {host['zero3_offload']:.1f} "
                  f"GiB, FSDP2 {host['fsdp2']:.1f} GiB (whole fp32 twins of the trained nets, every rank), "
                  f"FSDP2+offload {host['fsdp2_offload']:.1f} GiB (+ the shards, formula only: no accelerator measured it)",
              "total = static rows + max(activations, update scratch): the optimizer and EMA steps run after backward",
              "* formula only: FSDP2's CPU offload needs an accelerator (pinned memory), so no step here measured it"]
    lines.append("bytes per trained param (w weights, g grads; D = data-parallel ranks):")
    lines += [f"  {TITLES[s]:<15} {v}" for s, v in bytes_per_param(plan.precision).items()]
    if a is not None:
        what = ("the objective's loss + backward, frozen helpers' forward included" if m.path == "objective" else
                "the denoiser's forward + backward on inputs shaped by the helpers' configs")
        lines.append(f"activations: {what}; measured on CPU ({a.seconds:.0f} s), scaled linearly to batch "
                     f"{plan.batch_size}:")
        lines += [f"  {x}" for x in a.describe()]
        lines.append("  " + ("DDP under accelerate's (CPU) autocast; ZeRO and FSDP2 columns without its bf16 weight "
                             f"copies ({a.weight_copies / 2**20:.0f} MiB): DeepSpeed and FSDP2 hold bf16 weights"
                             if plan.precision != "no" else "fp32 in every column"))
    lines += [f"note: {n}" for n in m.notes]
    return "\n".join(lines)


MEMORY_UNITS = {"": GIB, "k": 2 ** 10, "m": 2 ** 20, "g": GIB, "t": 2 ** 40}


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '80G', '81920MiB' -> bytes. GB means GiB here, as GPU makers use it (an '80GB' A100
    has 81,920 MiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise GentrainError(f"--gpu-memory: {text!r} is not a memory size; use e.g. 80GB, 80GiB, 40G or 81920MiB")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])


def parse_batches(text: str) -> Optional[list[int]]:
    if text == "auto":
        return None
    try:
        sizes = sorted({int(x) for x in text.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1 or len(sizes) > 4:
        raise GentrainError(f"--measure-batches: {text!r}; use 'auto' or one to four batch sizes >= 1, e.g. 1,2")
    return sizes


def run_plan(args: Any) -> int:
    """`gentrain plan`: load the config, build, measure, print the table (or JSON)."""
    from gentrain.config import load_config

    for opt, v in (("--gpus", args.gpus), ("--nodes", args.nodes)):
        if v < 1:
            raise GentrainError(f"{opt}: {v} must be >= 1")
    if not 0 <= args.margin < 1:
        raise GentrainError(f"--margin: {args.margin} must be in [0, 1)")
    gpu_memory, batches = parse_memory(args.gpu_memory), parse_batches(args.measure_batches)
    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, args.gpus, args.nodes, gpu_memory=gpu_memory, margin=args.margin,
                     measure=False if args.no_measure else batches)
    print(json.dumps(plan.to_json(), indent=1) if args.json else format_plan(plan))
    return 0
