"""Where the Trainer's numbers and images go: accelerate's trackers (TensorBoard, ...) and metrics.jsonl.

The Trainer logs through the Accelerator (``acc.log``); what only a particular tracker can take
(an image for TensorBoard) goes through the functions here, so the loop never handles a tracker.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.tracking import TensorBoardTracker as _AccelerateTensorBoard
from accelerate.utils import listify

if TYPE_CHECKING:
    from PIL import Image


class JSONLTracker(GeneralTracker):
    """accelerate tracker writing one JSON line per `accelerator.log` call to metrics.jsonl."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_dir: str | Path):
        super().__init__()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = None  # opened on the first log, on the main process only

    @property
    def tracker(self):
        return self._f

    def store_init_configuration(self, values: dict) -> None:
        pass  # the resolved config is saved as config.yaml

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        if self._f is None:
            self._f = open(self.path, "a", buffering=1)
        row = {"step": step, **{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}}
        self._f.write(json.dumps(row) + "\n")

    def finish(self) -> None:
        if self._f is not None:
            self._f.close()


class TensorBoardTracker(_AccelerateTensorBoard):
    """accelerate's TensorBoard tracker (events in RUN/gentrain/), less its `writer.flush()` after
    every log: that flush waits for the event writer's thread to write the file (~1 ms a log row,
    a tenth of a millisecond a step at log_every 10; bench/trainer_overhead.py). The writer's own
    thread flushes every `flush_secs` instead, `flush_trackers` when the loop leaves (a crash
    included), and `end_training` closes the file. The rows written are the same."""

    FLUSH_SECS = 10   # TensorBoard's UI reloads every 30 s

    def __init__(self, logging_dir: str | Path):
        super().__init__("gentrain", logging_dir, flush_secs=self.FLUSH_SECS)

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        for k, v in listify(values).items():   # accelerate's TensorBoardTracker.log without the flush
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, global_step=step, **kwargs)
            elif isinstance(v, str):
                self.writer.add_text(k, v, global_step=step, **kwargs)
            elif isinstance(v, dict):
                self.writer.add_scalars(k, v, global_step=step, **kwargs)

    @on_main_process
    def flush(self) -> None:
        self.writer.flush()


def make_trackers(names: list[str], run_dir: Path) -> list:
    """What `Accelerator(log_with=...)` takes for run.trackers, and metrics.jsonl."""
    return [TensorBoardTracker(run_dir) if n == "tensorboard" else n for n in names] + [JSONLTracker(run_dir)]


def flush_trackers(acc: Accelerator) -> None:
    """Everything logged so far on disk (main process; the others hold no writer)."""
    for tracker in acc.trackers:
        if isinstance(tracker, TensorBoardTracker):
            tracker.flush()


def log_image(acc: Accelerator, tag: str, img: Image.Image, step: int) -> None:
    """The image in TensorBoard, where the run logs to it (main process; no-op otherwise)."""
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
