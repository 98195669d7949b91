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
from accelerate.tracking import GeneralTracker

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


def log_image(acc: Accelerator, tag: str, img: Image.Image, step: int) -> None:
    """The image in TensorBoard, where the run logs to it (main process; no-op otherwise)."""
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
