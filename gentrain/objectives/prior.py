"""DreamBooth-style prior preservation for fine-tunes (`model.prior`), as diffusers' DreamBooth scripts
(examples/dreambooth/train_dreambooth.py, train_dreambooth_lora.py, train_dreambooth_lora_sdxl.py,
train_dreambooth_lora_sd3.py: --with_prior_preservation, --class_prompt, --class_data_dir,
--num_class_images, --prior_loss_weight, --sample_batch_size) do it: images of the class the new token
belongs to ("a photo of a dog" for "a photo of sks dog"), captioned with `class_prompt`, join every batch,
one class sample per instance sample, in one forward pass; the loss is the instance half's mean plus
`prior_loss_weight` times the class half's mean. The class images are a shard set the user gives, or are
drawn once by the base pipeline (rank 0, before the first step) into `class_data_dir` (default: the run's
`class_images/`), and reused by a resumed run. It works through the pipeline adapter, for every class.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from gentrain.distributed.collectives import barrier, rank
from gentrain.errors import GentrainError
from gentrain.maths.rng import untouched_rng

CLASS_IMAGES = "class_images"   # the run-folder subfolder generated class images go to by default


@dataclass
class PriorSpec:
    class_prompt: str = ""          # on when set: the caption of the class images (diffusers' --class_prompt)
    class_data_dir: str = ""        # shards of class images (index.json); missing or empty: drawn there by the base
                                    # pipeline; "": the run folder's class_images/
    num_class_images: int = 100     # drawn, or at most read (diffusers' --num_class_images default 100)
    prior_loss_weight: float = 1.0  # the class half's loss weight (diffusers' --prior_loss_weight default 1.0)
    sample_batch_size: int = 4      # images per pipeline call while drawing (diffusers' --sample_batch_size default 4)


def check_prior(cfg: Any) -> None:
    """One-line refusals for model.prior, before anything loads."""
    p = cfg.model.prior
    if not p.class_prompt:
        if p.class_data_dir:
            raise GentrainError("config key 'model.prior.class_data_dir': class images need model.prior.class_prompt "
                                "(their caption; prior preservation is on when it is set)")
        return
    if p.num_class_images < 1 or p.sample_batch_size < 1 or not p.prior_loss_weight > 0:
        raise GentrainError("config key 'model.prior': num_class_images and sample_batch_size must be >= 1 and "
                            "prior_loss_weight > 0")
    if cfg.data.aspect_buckets:
        raise GentrainError("config key 'model.prior.class_prompt': prior preservation puts square class images "
                            "of data.image_size beside each batch; it does not go with data.aspect_buckets=true")
    folder = Path(p.class_data_dir).expanduser() if p.class_data_dir else None
    if folder is not None and folder.exists() and not (folder / "index.json").is_file() and \
            (not folder.is_dir() or any(folder.iterdir())):
        raise GentrainError(f"config key 'model.prior.class_data_dir': {p.class_data_dir} is neither a shard set "
                            "(index.json) nor an empty folder to draw class images into (a folder of images: "
                            "`gentrain data build --source folder:DIR --out SHARDS`)")
    from gentrain.objectives.adapters.cached import pipeline_cache

    if pipeline_cache(cfg) is not None:
        raise GentrainError("config key 'model.prior.class_prompt': prior preservation encodes the class prompt "
                            "live; it does not go with cached shards (`gentrain data cache`): train on the images")


def class_folder(cfg: Any) -> Path:
    p = cfg.model.prior
    return Path(p.class_data_dir).expanduser() if p.class_data_dir else \
        Path(cfg.run.output_dir) / cfg.run.name / CLASS_IMAGES


class PriorMixin:
    """A fine-tune objective's prior preservation: the class images beside each batch, the weighted loss."""

    prior_folder: Optional[Path] = None                # the class images' shards (on when set)
    prior_images: Optional[dict[str, Tensor]] = None   # class_images(), once read
    prior_on = True                                    # off while the validation loss is measured
    prior_logs: dict[str, Tensor] = {}

    def setup_prior(self, cfg: Any) -> None:
        """Draw the class images (rank 0, the others wait) where the folder holds none; they are read at the
        first batch (a run rebuilt to export or sample reads nothing)."""
        p = cfg.model.prior
        if not p.class_prompt:
            return
        folder = class_folder(cfg)
        if not (folder / "index.json").is_file():
            if rank() == 0:
                with untouched_rng():
                    self.draw_class_images(p, folder, cfg.train.seed)
            barrier()
        self.prior_folder = folder

    def class_images(self) -> dict[str, Tensor]:
        """{"image": (N, C, H, W), "size_crop"?: (N, 4)} of the class images, read once through the data
        pipeline as the run reads its data (data.image_size, channels, size_crop; no augmentation), on the CPU."""
        if self.prior_images is None:
            from gentrain.eval.heldout import heldout_batches

            cfg, p = self.cfg, self.cfg.model.prior
            read = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, shards=str(self.prior_folder),
                                                                      num_samples=p.num_class_images))
            with untouched_rng():   # read at the first batch of a run, straight or resumed: the same draws follow
                batches = list(heldout_batches(read, batch_size=p.num_class_images))
            if not batches:
                raise GentrainError(f"config key 'model.prior.class_data_dir': {self.prior_folder} holds no images")
            self.prior_images = {k: torch.cat([torch.as_tensor(b[k]) for b in batches]).cpu()
                                 for k in ("image", "size_crop") if k in batches[0]}
        return self.prior_images

    @torch.no_grad()
    def draw_class_images(self, p: PriorSpec, folder: Path, seed: int) -> None:
        """num_class_images of class_prompt drawn by the base pipeline (adapters off) at data.image_size, the
        model's sample_steps and guidance, into a shard set at `folder` (written beside it, then moved in)."""
        from PIL import Image

        from gentrain.data_pipeline.writer import write_shards

        size, pipe = self.cfg.data.image_size, self.pipeline()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        pipe.to(device)
        g = torch.Generator().manual_seed(seed)

        def samples() -> Any:
            for start in range(0, p.num_class_images, p.sample_batch_size):
                n = min(p.sample_batch_size, p.num_class_images - start)
                images = pipe(prompt=[p.class_prompt] * n, height=size, width=size, generator=g, output_type="pt",
                              num_inference_steps=self.m.sample_steps, guidance_scale=self.guidance_scale).images
                for i, x in enumerate((images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()):
                    img = Image.fromarray(x[0].numpy(), "L") if x.shape[0] == 1 else \
                        Image.fromarray(x[:3].permute(1, 2, 0).numpy(), "RGB")
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    yield {"__key__": f"class_{start + i:06d}", "png": buf.getvalue(), "txt": p.class_prompt,
                           "json": json.dumps({"original_width": size, "original_height": size})}

        self._adapters(False)
        tmp = folder.with_name(folder.name + ".drawing")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_shards(samples(), str(tmp), source=f"class images of {p.class_prompt!r} drawn by {self.m.pretrained}")
        finally:
            self._adapters(True)
            pipe.to("cpu")
        if folder.is_dir():
            folder.rmdir()   # empty (check_prior)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)

    def inputs(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch with as many class samples after it (drawn at random from the class images), and the
        per-sample loss weights that make the loss instance mean + prior_loss_weight * class mean."""
        self.sample_weights = None
        if self.prior_folder is None or not self.prior_on:
            return super().inputs(batch)
        p, n, prior = self.cfg.model.prior, len(batch["key"]), self.class_images()
        pick = self.rng.randint(0, prior["image"].shape[0], n, device=batch["image"].device).cpu()
        both = {"image": torch.cat([batch["image"], prior["image"][pick].to(batch["image"])]),
                "txt": list(batch["txt"]) + [p.class_prompt] * n, "key": list(batch["key"]) + ["class"] * n}
        if "size_crop" in batch and "size_crop" in prior:
            sc = torch.as_tensor(batch["size_crop"])
            both["size_crop"] = torch.cat([sc, prior["size_crop"][pick].to(sc)])
        x0, cond = super().inputs(both)
        weights = torch.cat([torch.full((n,), 2.0), torch.full((n,), 2.0 * p.prior_loss_weight)])
        self.sample_weights = weights.to(x0.device)
        return x0, cond

    def batch_mean(self, per_sample: Tensor) -> Tensor:
        if self.sample_weights is not None:
            n = per_sample.shape[0] // 2
            self.prior_logs = {"prior/instance_loss": per_sample[:n].detach().mean(),
                               "prior/class_loss": per_sample[n:].detach().mean()}
        return super().batch_mean(per_sample)

    def loss(self, phase: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        self.prior_logs = {}
        total, logs = super().loss(phase, batch)
        return total, {**logs, **self.prior_logs}

    @torch.no_grad()
    def validation(self) -> dict[str, float]:
        self.prior_on = False   # the held-out loss stays the instance data's, comparable with a run without
        try:
            return super().validation()
        finally:
            self.prior_on = True
