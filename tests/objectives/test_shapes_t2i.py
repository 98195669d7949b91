"""t2i_flow_shapes and vae_shapes train through the CLI and the run's eval is the analytic shapes
checker; the checker's own accuracy is tested in test_shapes_checker.py."""
import json

import pytest

from conftest import ok, run_cli


@pytest.fixture(scope="module")
def shapes32(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("shapes32")
    build_source("shapes", str(root / "data"), size=32, count=64, max_samples=32)
    return root


def test_shapes_autoencoder_then_text_to_image_scored_by_the_checker(shapes32):
    common = ["train.batch_size=8", "train.max_steps=2", "train.log_every=1", "train.sample_every=2",
              "train.checkpoint_every=2", "train.progress_bar=false", f"data.shards={shapes32 / 'data'}",
              f"run.output_dir={shapes32}"]
    r = run_cli("train", "vae_shapes", *common, "model.block_out_channels=[8,16,16]", "eval.num_samples=16",
                "run.name=ae", timeout=600)
    ok(r)
    assert run_cli("export", str(shapes32 / "ae"), "--out", str(shapes32 / "vae"), timeout=300).returncode == 0
    r = run_cli("train", "t2i_flow_shapes", *common, "model.block_out_channels=[16,32]", "model.layers_per_block=1",
                "model.norm_num_groups=8", "model.sample_steps=4", f"model.latent.autoencoder={shapes32 / 'vae'}",
                "eval.num_samples=20", "run.name=t2i", timeout=600)
    ok(r)
    res = json.loads(r.stdout)
    assert res["eval/shapes_n"] == 20 and res["eval/guidance_scale"] == 4.0
    # two untrained steps draw no coloured shapes: the checker finds (almost) nothing right
    assert res["eval/shapes_all"] <= 0.1 and res["eval/shapes_colour"] <= 0.3, res
