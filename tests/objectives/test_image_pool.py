"""CycleGAN's image pool: pass-through while filling, replay probability 1/2, exact resume."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from gentrain.maths.rng import BatchRNG
from gentrain.objectives.image_pool import ImagePool


def _batch(start: int, n: int) -> torch.Tensor:
    """n images (1, 2, 2) whose every pixel is their id start, start + 1, ..."""
    return torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()


def _ids(x: torch.Tensor) -> list[int]:
    return x[:, 0, 0, 0].long().tolist()


def _rand(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda n: torch.rand(n, generator=g)


def test_fills_first_then_replays_half_the_time():
    pool, rand = ImagePool(10), _rand(0)
    assert _ids(pool.query(_batch(0, 4), rand)) == [0, 1, 2, 3]
    assert _ids(pool.query(_batch(4, 6), rand)) == [4, 5, 6, 7, 8, 9]  # the first `size` pass through
    assert len(pool) == 10
    replayed, total, next_id = 0, 0, 10
    seen_slots = set()
    for _ in range(500):
        before = set(_ids(pool.images))
        x = _batch(next_id, 20)
        out = _ids(pool.query(x, rand))
        for i, o in zip(range(next_id, next_id + 20), out):
            total += 1
            if o != i:
                replayed += 1
                assert o in before or o in range(next_id, i)  # a stored image (maybe from this batch)
        seen_slots |= {j for j, v in enumerate(_ids(pool.images)) if v >= next_id}
        next_id += 20
        assert len(pool) == 10
    assert abs(replayed / total - 0.5) < 0.03, replayed / total
    assert seen_slots == set(range(10))  # every slot gets replaced
    # a replayed image leaves the pool and the new one takes its slot
    stored = set(_ids(pool.images))
    x = _batch(10**6, 1)
    out = _ids(pool.query(x, lambda n: torch.tensor([0.1, 0.35])))  # replay, slot 3
    assert out[0] in stored and _ids(pool.images)[3] == 10**6 and out[0] not in _ids(pool.images)
    assert _ids(pool.query(_batch(7, 1), lambda n: torch.tensor([0.7, 0.0]))) == [7]  # no replay


def test_size_zero_is_a_pass_through():
    pool = ImagePool(0)

    def no_draws(n):
        raise AssertionError("a size-0 pool draws nothing")

    x = _batch(0, 5).requires_grad_()
    y = pool.query(x, no_draws)
    assert torch.equal(y, x) and not y.requires_grad and len(pool) == 0
    with pytest.raises(ValueError, match=">= 0"):
        ImagePool(-1)


def test_state_round_trip_continues_bitwise(tmp_path):
    g = torch.Generator().manual_seed(1)
    rng = BatchRNG(generator=g)  # a run's own per-step RNG
    pool = ImagePool(8)
    assert pool.state_dict()["images"].numel() == 0
    data = torch.Generator().manual_seed(2)
    for _ in range(5):
        pool.query(torch.randn(3, 1, 4, 4, generator=data), rng.rand)
    save_file(pool.state_dict(), str(tmp_path / "pool.safetensors"))
    rng_state, data_state = g.get_state(), data.get_state()
    straight = [pool.query(torch.randn(3, 1, 4, 4, generator=data), rng.rand) for _ in range(10)]

    g2 = torch.Generator()
    g2.set_state(rng_state)
    data.set_state(data_state)
    resumed = ImagePool(8)
    resumed.load_state_dict(load_file(str(tmp_path / "pool.safetensors")))
    again = [resumed.query(torch.randn(3, 1, 4, 4, generator=data), BatchRNG(generator=g2).rand) for _ in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(straight, again))
    assert torch.equal(resumed.images, pool.images)
    empty = ImagePool(8)
    empty.load_state_dict(ImagePool(8).state_dict())
    assert len(empty) == 0
    with pytest.raises(ValueError, match="do not fit"):
        ImagePool(2).load_state_dict(pool.state_dict())
    with pytest.raises(ValueError, match="do not match"):
        pool.query(torch.zeros(1, 3, 4, 4), rng.rand)
