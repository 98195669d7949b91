"""Weighted mixing (data.datasets): every batch holds each dataset's weight share, each dataset
keeps exact epochs of its own (a small, heavily weighted set repeats; a large, lightly weighted
one is undersampled, never truncated), the position resumes bitwise, the Trainer logs
per-dataset counts, and bad mixtures are refused before any step."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import torch

from conftest import read_metrics, run_cli, train_here
from data_helpers.shards import take, write_uneven
from gentrain.data_pipeline.config import DataConfig, DatasetConfig
from gentrain.data_pipeline.mixing import MixedStream, batch_shares
from gentrain.errors import GentrainError
from gentrain.config import load_config

pytestmark = pytest.mark.data_scale

LARGE = (100,) * 10            # 1,000 samples, weight 0.3
SMALL = (37, 41, 45, 41, 36)   # 200 samples, weight 0.7


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    large = write_uneven(str(root / "large"), LARGE)
    small = write_uneven(str(root / "small"), SMALL, prefix="t")   # keys t0_00, ...: told apart from s0_00
    return root, large, small


def mixed(root, batch_size=64, rank=0, world_size=1, workers=0, **kw):
    cfg = DataConfig(source="shards", num_workers=workers, image_size=8, datasets=[
        DatasetConfig(shards=str(root / "large"), weight=0.3, name="large"),
        DatasetConfig(shards=str(root / "small"), weight=0.7, name="small")], **kw)
    return MixedStream(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=3)


def test_batch_shares_round_to_lane_multiples_and_keep_every_dataset():
    assert batch_shares(64, [0.7, 0.3], 1) == [45, 19]
    assert batch_shares(64, [0.3, 0.7], 2) == [20, 44]          # multiples of the 2 lanes
    assert batch_shares(8, [0.98, 0.01, 0.01], 1) == [6, 1, 1]    # each keeps one lane-batch
    with pytest.raises(GentrainError, match="cannot hold one lane-batch of each of the 3 data.datasets"):
        batch_shares(4, [1, 1, 1], 2)


def test_proportions_hold_over_10k_samples_and_each_dataset_keeps_exact_epochs(two_sets):
    root, large, small = two_sets
    st = mixed(root)
    assert st.shares == [19, 45]
    per_epoch = {"large": defaultdict(list), "small": defaultdict(list)}
    n = 0
    for batch in take(st, 157):            # 10,048 samples
        n += len(batch["key"])
        for k, e in zip(batch["key"], batch["epoch"].tolist()):
            per_epoch["large" if k.startswith("s") else "small"][e].append(k)
    got = {name: sum(map(len, eps.values())) / n for name, eps in per_epoch.items()}
    print(f"\nshares over {n} samples: {got} (weights 0.3 / 0.7)")
    assert abs(got["large"] - 0.3) <= 0.02 and abs(got["small"] - 0.7) <= 0.02
    # every completed epoch of each dataset reads each of its samples exactly once
    for name, want in (("large", large), ("small", small)):
        eps = per_epoch[name]
        done = sorted(eps)[:-1]   # the last one is still running
        assert len(done) == {"large": 2, "small": 35}[name]     # the small set repeats, the large is undersampled
        for e in done:
            assert Counter(eps[e]) == Counter(want), (name, e)
    assert st.stats()["small/epoch"] == 35 and st.stats()["large/epoch"] == 2
    assert st.stats()["large/consumed_samples"] + st.stats()["small/consumed_samples"] == n


def test_mixed_position_resumes_bitwise_with_workers(two_sets):
    root, _, _ = two_sets
    st = mixed(root, workers=2)
    assert st.shares == [20, 44]
    take(st, 7)
    state = json.loads(json.dumps(st.state_dict()))
    want = take(st, 5)   # the same stream goes on from its position
    again = mixed(root, workers=2)
    again.load_state_dict(state)
    got = take(again, 5)
    for a, b in zip(want, got):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    other = DataConfig(source="shards", num_workers=2, image_size=8, datasets=[
        DatasetConfig(shards=str(root / "large"), weight=0.5, name="large"),
        DatasetConfig(shards=str(root / "small"), weight=0.5, name="small")])
    with pytest.raises(GentrainError, match="does not fit this mixture .*weights: saved \\[0.3, 0.7\\]"):
        MixedStream(other, batch_size=64, rank=0, world_size=1, seed=3).load_state_dict(state)


def test_a_layout_change_remaps_each_dataset(two_sets):
    """Saved by 2 ranks, resumed on 1: each dataset's rest of the epoch exactly once."""
    root, large, small = two_sets
    ranks = [mixed(root, batch_size=32, rank=r, world_size=2) for r in range(2)]
    seen = {"large": [], "small": []}
    for st in ranks:
        for b in take(st, 3):
            for k, e in zip(b["key"], b["epoch"].tolist()):
                if e == 0:
                    seen["large" if k.startswith("s") else "small"].append(k)
    one = mixed(root, batch_size=64)
    one.load_state_dict(one.remapped_state([st.state_dict() for st in ranks]))
    for b in take(one, 53):
        for k, e in zip(b["key"], b["epoch"].tolist()):
            if e == 0:
                seen["large" if k.startswith("s") else "small"].append(k)
    # 2 ranks x 3 batches of 10 + 53 batches of 19 large samples: past the end of epoch 0 (1,000)
    assert Counter(seen["large"]) == Counter(large)
    assert Counter(seen["small"]) == Counter(small)


def test_bad_mixtures_are_refused_with_the_key(two_sets, tmp_path):
    root, _, _ = two_sets
    sets = f"[{{shards: {root / 'large'}, weight: 0.3}}, {{shards: {root / 'small'}, weight: 0.7}}]"
    cases = [
        ([f"data.datasets={sets}", f"data.shards={root / 'large'}"], "give either data.shards or data.datasets"),
        ([f"data.datasets=[{{shards: {root / 'large'}, weight: 0}}]"], "'data.datasets[0].weight': 0"),
        ([f"data.datasets=[{{shards: a, name: x}}, {{shards: b, name: x}}]"], "'data.datasets[1].name': 'x' must be unique"),
        ([f"data.datasets={sets}", "data.aspect_buckets=true"], "aspect buckets (data.aspect_buckets) do not mix"),
    ]
    for over, msg in cases:
        with pytest.raises(GentrainError, match=msg.replace("[", "\\[").replace("(", "\\(").replace(")", "\\)")):
            load_config("vae_digits", ["data.shards=null", *over])
    missing = f"[{{shards: {root / 'large'}}}, {{shards: {tmp_path / 'nowhere'}, name: extra}}]"
    r = run_cli("train", "vae_digits", "data.shards=null", f"data.datasets={missing}", "train.max_steps=2",
                f"run.output_dir={tmp_path}", "eval.shards=null")
    assert r.returncode != 0 and "data.datasets[extra]" in r.stderr and "nowhere" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "vae_digits" / "checkpoints").exists()


def test_a_run_on_two_datasets_logs_per_dataset_counts_and_resumes_bitwise(digits16, tmp_path):
    sets = (f"[{{shards: {digits16 / 'train'}, weight: 0.75, name: train}}, "
            f"{{shards: {digits16 / 'test'}, weight: 0.25, name: test}}]")
    args = ["data.shards=null", f"data.datasets={sets}", "model.block_out_channels=[8,16]",
            "model.norm_num_groups=4", "train.batch_size=16", "train.max_steps=6", "train.log_every=1",
            "train.sample_every=0", "train.checkpoint_every=100", "train.progress_bar=false", "eval.num_samples=16",
            "eval.shards=null", "run.trackers=[]"]
    train_here("vae_digits", tmp_path, "straight", *args)
    train_here("vae_digits", tmp_path, "split", *args, stop_at=3)
    train_here("vae_digits", tmp_path, "split", *args, resume=True)
    rows = {n: {m["step"]: m for m in read_metrics(tmp_path / n) if "loss/ae" in m} for n in ("straight", "split")}
    assert [rows["split"][s]["loss/ae"] for s in (4, 5, 6)] == [rows["straight"][s]["loss/ae"] for s in (4, 5, 6)]
    last = rows["straight"][6]
    assert last["data/train/consumed_samples"] == 6 * 12 and last["data/test/consumed_samples"] == 6 * 4
