"""Issue 32's short shapes run: the better text-to-image transformer, trained briefly, beats its untrained
self on every attribute of the analytic shapes checker (colour, shape, size, position, count).

MEMORISATION, stated plainly: the run trains on the very scenes whose captions it is then scored on (the
held-out scenes of eval.seed, make_shape_scene(i, seed=eval.seed + 12345), i < 8, built as its shards), so
it checks that training moves every attribute off the untrained floor through the library's own route
(Trainer, the net, the evaluator), not how well the net generalises: the figure of merit on held-out
captions is bench/shapes_quality.py's. Pixel space at 32 px (no autoencoder to train first), a tiny CLIP
built offline, the diffusion family with the x0 target (`model.prediction_type=sample`, DDIM): the flow
family's velocity target at the same size, lr and steps drew ragged noisy blobs the checker rejects as
shapes (shape 0.000 at 300 steps; docs/benchmarks.md), the x0 target draws clean ones."""
import json

import pytest
import torch

from conftest import make_tiny_clip, train_here

pytestmark = [pytest.mark.t2i, pytest.mark.slow]

N = 8            # scenes trained on and scored
MARGIN = 0.5     # every attribute: trained > untrained + MARGIN
NET = "mmdit"    # the better of the two at equal steps here (docs/benchmarks.md)
STEPS = 250


def test_short_shapes_run_of_the_better_transformer_beats_its_untrained_self(tmp_path):
    from gentrain.config import load_config
    from gentrain.data_pipeline.sources import build_source
    from gentrain.eval.shapes import ATTRIBUTES, HELDOUT_SEED_OFFSET, beats, evaluate_text_to_image_shapes
    from gentrain.objectives import build_objective

    seed = 0
    build_source("shapes", str(tmp_path / "data"), size=32, count=N, seed=seed + HELDOUT_SEED_OFFSET)
    make_tiny_clip(tmp_path / "clip")
    over = [f"model.net={NET}", "model.dit_layers=2", "model.dit_heads=4", "model.dit_head_dim=32",
            "model.patch_size=4", "model.prediction_type=sample", "model.min_snr_gamma=0", "model.sampler=ddim",
            "model.sample_steps=10", "model.latent.autoencoder=null", f"model.latent.text_encoder={tmp_path / 'clip'}",
            "model.latent.max_length=64", "model.latent.cfg_dropout=0", "model.latent.guidance_scale=1",
            f"data.shards={tmp_path / 'data'}", "data.image_size=32", "data.channels=3", "data.mode=resampled",
            "data.num_workers=0", "train.batch_size=32", "train.lr=3e-3", "train.lr_schedule=constant",
            "train.warmup_steps=0", "train.ema_decay=0", f"train.max_steps={STEPS}",
            "train.log_every=50", "train.sample_every=0", "train.checkpoint_every=0", "train.progress_bar=false",
            "run.trackers=[]", f"eval.seed={seed}", f"eval.num_samples={N}", "eval.shapes=true", "eval.digits=false"]
    train_here("t2i_ddpm_digits", tmp_path, "run", *over)
    res = json.loads((tmp_path / "run" / "eval.json").read_text())
    trained = {k: res[f"eval/shapes_{k}"] for k in ATTRIBUTES}

    cfg = load_config(str(tmp_path / "run" / "config.yaml"), [])
    torch.manual_seed(cfg.train.seed)
    untrained_obj = build_objective(cfg)
    next(iter(untrained_obj.nets.values())).eval()
    bad = evaluate_text_to_image_shapes(untrained_obj, cfg, seed=cfg.eval.seed)
    untrained = {k: bad[f"eval/shapes_{k}"] for k in ATTRIBUTES}
    print(f"\n{NET}, {N} memorised scenes ({int(res['eval/shapes_n_position'])} two-object), "
          f"step {int(res['step'])}:\n" + "\n".join(f"  {k:<9s} trained {trained[k]:.3f}  untrained {untrained[k]:.3f}"
                                                    for k in ATTRIBUTES))
    assert res["eval/shapes_n"] == N and res["eval/shapes_n_position"] >= 3      # position is over >= 3 prompts
    assert not beats(trained, untrained, MARGIN), (trained, untrained)
