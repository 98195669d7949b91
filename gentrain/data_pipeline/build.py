"""Build the Trainer's BatchStream from the `data:` config."""
from __future__ import annotations

from gentrain.data_pipeline.config import DataConfig
from gentrain.data_pipeline.stream import BatchStream

SOURCES = ("toy2d", "shards")


def build_stream(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 uint8_images: bool = False) -> BatchStream:
    """`uint8_images`: image batches stay uint8 for the consumer to convert on its device
    (reader.make_shard_stream); sources without images ignore it."""
    if cfg.source == "toy2d":
        from gentrain.data_pipeline.toy2d import Toy2DStream

        return Toy2DStream(cfg.toy2d, batch_size, seed=seed, rank=rank, world_size=world_size,
                           num_workers=cfg.num_workers)
    if cfg.source == "shards" and cfg.datasets:
        from gentrain.data_pipeline.mixing import MixedStream

        return MixedStream(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                           uint8_images=uint8_images)
    if cfg.source == "shards":
        from gentrain.data_pipeline.reader import make_shard_stream  # the WebDataset reader

        return make_shard_stream(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                 uint8_images=uint8_images)
    raise ValueError(f"data.source: unknown source {cfg.source!r}; choose one of {', '.join(SOURCES)}")
