"""`gentrain data cache`: latents + text embeddings once, read back transparently, the same on
1 and 2 processes."""
import io
import json
import sys
import tarfile

import numpy as np
import pytest
import torch

from conftest import cli_env, free_port, ok, run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import AutoencoderKL

    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("cache")
    build_source("digits", str(root / "digits"), size=8, count=100, max_samples=40)   # shards of 40, 40, 20
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=8)
    vae.save_pretrained(str(root / "vae"))
    return root


def cache_args(root, out):
    return ["data", "cache", "--shards", str(root / "digits"), "--out", str(out), "--autoencoder", str(root / "vae"),
            "--image-size", "8", "--channels", "1", "--max-length", "12", "--batch-size", "16"]


def arrays(out):
    found = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                found[(shard.name, m.name)] = tf.extractfile(m).read()
    return found


def test_cache_is_read_back_and_matches_direct_encoding(setup):
    out = setup / "single"
    r = run_cli(*cache_args(setup, out), timeout=600)
    ok(r)
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 100 and [s["samples"] for s in index["shards"]] == [40, 40, 20]
    assert index["cache"]["max_length"] == 12 and index["cache"]["scaling_factor"] == pytest.approx(0.18215)

    from diffusers import AutoencoderKL

    from gentrain.data_pipeline.config import DataConfig
    from gentrain.data_pipeline.reader import make_shard_stream
    from gentrain.modeling.text_encoders import FrozenTextEncoder

    raw = make_shard_stream(DataConfig(source="shards", shards=str(setup / "digits"), image_size=8, channels=1,
                                       shuffle_buffer=1), batch_size=8, rank=0, world_size=1, seed=0)
    cached = make_shard_stream(DataConfig(source="shards", shards=str(out), image_size=8, channels=1, shuffle_buffer=1),
                               batch_size=8, rank=0, world_size=1, seed=0)
    a, b = next(iter(raw)), next(iter(cached))
    assert a["key"] == b["key"] and a["txt"] == b["txt"] and torch.equal(a["label"], b["label"])
    assert b["latent"].shape == (8, 2, 4, 4, 4) and b["emb"].shape == (8, 12, 384) and b["mask"].shape == (8, 12)
    vae = AutoencoderKL.from_pretrained(str(setup / "vae")).eval()
    with torch.no_grad():
        post = vae.encode(a["image"]).latent_dist
    torch.testing.assert_close(b["latent"][:, 0], post.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b["latent"][:, 1], post.logvar, rtol=1e-5, atol=1e-6)
    emb, mask = FrozenTextEncoder(max_length=12)(a["txt"])
    torch.testing.assert_close(b["emb"], emb, rtol=1e-5, atol=1e-5)
    assert torch.equal(b["mask"].long(), mask.long())


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_cache_equals_single_process_cache(setup):
    # `accelerate launch` runs each process with OMP_NUM_THREADS=1; CPU conv kernels differ in the
    # last bit between thread counts (measured: 20 of 100 latents, |diff| <= 2.4e-7), so the
    # single-process reference runs on one thread too, and then the caches agree byte for byte.
    single = setup / "single_1thread"
    r = run_cli(*cache_args(setup, single), env=cli_env(OMP_NUM_THREADS="1"), timeout=600)
    ok(r)
    r = run_cli(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(free_port()), "-m", "gentrain", *cache_args(setup, setup / "double"), module=False, timeout=600)
    ok(r)
    assert json.loads(r.stdout.strip().splitlines()[-1])["processes"] == 2
    one, two = arrays(single), arrays(setup / "double")
    assert one.keys() == two.keys() and len(one) == 100 * 5
    assert all(one[k] == two[k] for k in one)            # byte for byte
    assert json.loads((single / "index.json").read_text())["shards"] == \
        json.loads((setup / "double" / "index.json").read_text())["shards"]


def test_bad_autoencoder_path_is_a_clear_error(setup, tmp_path):
    args = cache_args(setup, tmp_path / "o")
    args[args.index("--autoencoder") + 1] = str(tmp_path / "nope")
    r = run_cli(*args, timeout=300)
    assert r.returncode == 2 and "not a diffusers AutoencoderKL folder" in r.stderr and "Traceback" not in r.stderr


def test_npy_decoding_matches_numpy_and_refuses_pickles_and_truncation():
    from gentrain.data_pipeline.decode import _load_npy

    for arr in (np.arange(12, dtype=np.float16).reshape(3, 4), np.asfortranarray(np.random.rand(3, 5)),
                np.array(7, dtype=np.uint8), np.zeros((2, 0), dtype=np.int64)):
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        got = _load_npy(buf.getvalue())
        assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        _load_npy(buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.ones(100, dtype=np.float32))
    with pytest.raises(ValueError, match="truncated"):
        _load_npy(buf.getvalue()[:-8])
    with pytest.raises(ValueError, match="magic"):
        _load_npy(b"PK\x03\x04 not numpy")
