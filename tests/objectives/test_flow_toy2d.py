"""The first family end to end through the real CLI: quality figure, sample, eval, export."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ok, read_metrics, run_cli

SMALL = ["train.max_steps=600", "train.batch_size=256", "model.hidden=128", "model.depth=3",
         "train.warmup_steps=20", "train.ema_decay=0.99", "train.sample_every=300", "train.checkpoint_every=300",
         "train.log_every=50", "train.progress_bar=false", "eval.num_samples=2000"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    r = run_cli("train", "flow_toy2d", *SMALL, f"run.output_dir={out}", "run.name=small", timeout=600)
    ok(r)
    return out / "small", json.loads(r.stdout)


def quality_threshold(real_vs_real: float) -> float:
    # 5x the energy distance between two real sets of the same size (n=2000: ~0.002)
    return 5 * real_vs_real


def test_trained_model_meets_energy_distance_threshold(trained):
    run_dir, results = trained
    ed, rr = results["eval/energy_distance"], results["eval/energy_distance_real_vs_real"]
    assert ed < quality_threshold(rr), (ed, rr)
    rows = read_metrics(run_dir)
    assert any("eval/energy_distance" in r for r in rows)          # the figure is in the run's metrics
    losses = [r["loss/main"] for r in rows if "loss/main" in r]
    assert losses[-1] < losses[0]
    assert rows[-2]["kimg"] == pytest.approx(600 * 256 / 1000)     # progress counted in images
    assert (run_dir / "samples" / "step_300.png").is_file() and (run_dir / "samples" / "step_600.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.rglob("*"))  # TensorBoard


def test_untrained_model_fails_the_threshold(trained, fresh_accelerate_state):
    from gentrain.config import load_config
    from gentrain.eval.metrics import evaluate
    from gentrain.objectives import build_objective

    run_dir, results = trained
    cfg = load_config(str(run_dir / "config.yaml"))
    torch.manual_seed(0)
    res = evaluate(build_objective(cfg), cfg)
    assert res["eval/energy_distance"] > quality_threshold(res["eval/energy_distance_real_vs_real"])


def test_sample_eval_export_commands(trained, tmp_path):
    run_dir, results = trained
    r = run_cli("eval", str(run_dir), timeout=300)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["eval/energy_distance"] == pytest.approx(results["eval/energy_distance"], rel=1e-6)  # same seed
    r = run_cli("sample", str(run_dir), "-n", "500", "--out", str(tmp_path / "s.png"), timeout=300)
    assert r.returncode == 0, r.stderr
    samples = load_file(str(tmp_path / "s.safetensors"))["samples"]
    assert samples.shape == (500, 2) and torch.isfinite(samples).all()
    assert samples.abs().max() < 4  # inside the checkerboard's support, give or take
    r = run_cli("export", str(run_dir), "--out", str(tmp_path / "export"), timeout=300)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "export" / "gentrain_export.json").read_text())
    assert meta["weights"] == "ema" and meta["nets"] == ["velocity"]
    exported = load_file(str(tmp_path / "export" / "velocity.safetensors"))
    ema = load_file(str(run_dir / "checkpoints" / "step_600" / "ema_velocity.safetensors"))
    for k, v in ema.items():
        assert torch.equal(exported[k], v)
    r = run_cli("export", str(run_dir), "--out", str(tmp_path / "export"), timeout=300)
    assert r.returncode == 2 and "already exists" in r.stderr  # never overwrites
