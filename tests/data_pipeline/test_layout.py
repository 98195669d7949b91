"""Layout invariance in one process: what R ranks at batch B draw and read, put together, is what
1 rank at batch R*B draws and reads (the real multi-process runs are in test_parity.py)."""
import pytest
import torch

from data_helpers.shards import keys_of, stream, take, write_uneven
from gentrain.data_pipeline.toy2d import Toy2DStream
from gentrain.errors import GentrainError
from gentrain.objectives import BatchRNG


def draws(rng: BatchRNG, b: int) -> list[torch.Tensor]:
    x = torch.zeros(b, 3, 2, 2)
    return [rng.randn_like(x), rng.rand(b), rng.randint(0, 1000, b), rng.randn(b, 4, 1, 1)]


def test_batch_rng_ranks_take_their_rows_of_the_global_draw():
    torch.manual_seed(5)
    whole = draws(BatchRNG(), 8)
    after = torch.rand(3)
    for world in (2, 4):
        parts = []
        for rank in range(world):  # every rank on the same stream
            torch.manual_seed(5)
            parts.append(draws(BatchRNG(rank, world), 8 // world))
            assert torch.equal(torch.rand(3), after)  # the stream advanced alike
        for i, w in enumerate(whole):
            assert torch.equal(torch.cat([p[i] for p in parts]), w)
    torch.manual_seed(5)
    mine = BatchRNG().randn(6, 2)
    torch.manual_seed(5)
    assert torch.equal(mine, torch.randn(6, 2))  # one process: plain torch draws
    with pytest.raises(ValueError, match="rank 2"):
        BatchRNG(2, 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_toy2d_global_batch_does_not_depend_on_the_process_count(workers):
    whole = take(Toy2DStream("moons", 64, seed=3, num_workers=workers), 3)
    halves = [take(Toy2DStream("moons", 32, seed=3, rank=r, world_size=2), 3) for r in range(2)]
    for i, b in enumerate(whole):
        assert torch.equal(torch.cat([h[i]["x"] for h in halves]), b["x"])


def test_shard_batches_depend_only_on_the_lane_count_and_the_global_batch(tmp_path):
    write_uneven(str(tmp_path))
    kw = dict(shuffle_buffer=8, seed=2)
    one = take(stream(str(tmp_path), batch_size=8, num_workers=2, **kw), 25)   # 1 rank x 2 workers, straddles epochs
    two = [take(stream(str(tmp_path), batch_size=4, rank=r, world_size=2, num_workers=0, **kw), 25) for r in range(2)]
    four = [take(stream(str(tmp_path), batch_size=2, rank=r, world_size=2, num_workers=2, **kw), 25) for r in range(2)]
    for i, b in enumerate(one):
        assert b["key"] == two[0][i]["key"] + two[1][i]["key"] != four[0][i]["key"] + four[1][i]["key"]
        assert torch.equal(b["image"], torch.cat([two[0][i]["image"], two[1][i]["image"]]))
        assert torch.equal(b["epoch"], torch.cat([two[0][i]["epoch"], two[1][i]["epoch"]]))
    # 4 lanes: the same for 2 ranks x 2 workers and 1 rank x 4 workers
    assert keys_of(take(stream(str(tmp_path), batch_size=4, num_workers=4, **kw), 5)) == [
        k for i in range(5) for r in range(2) for k in four[r][i]["key"]]


def test_batch_must_split_over_the_workers(tmp_path):
    write_uneven(str(tmp_path))
    with pytest.raises(GentrainError, match=r"'train.batch_size': 6 must be a multiple of data.num_workers=4"):
        stream(str(tmp_path), batch_size=6, num_workers=4)
    from gentrain.config import load_config

    with pytest.raises(GentrainError, match=r"'train.batch_size': 9 must be a multiple of data.num_workers=2"):
        load_config("t2i_flow_digits", ["train.batch_size=9", "data.num_workers=2"])
