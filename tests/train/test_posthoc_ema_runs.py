"""Post-hoc EMA in training runs (train.ema=posthoc) and `gentrain ema`: config errors in one line,
stop/resume bitwise with the profiles, snapshots that keep_last never prunes, a reconstruction that
sample/eval/export read like any EMA."""
import json

import pytest
from safetensors.torch import load_file

from conftest import ok, read_metrics, run_cli

pytestmark = pytest.mark.ema

POSTHOC = ["train.ema=posthoc", "train.ema_decay=0", "train.posthoc_snapshot_every=2", "train.max_steps=6",
           "train.checkpoint_every=2", "train.keep_last=1", "train.log_every=1", "train.sample_every=0",
           "train.progress_bar=false", "eval.num_samples=200", "train.batch_size=128", "train.warmup_steps=2",
           "train.lr_schedule=cosine"]


@pytest.mark.parametrize("over,message", [
    (["train.ema=slow"], "config key 'train.ema': 'slow' is not allowed; choose one of fixed, posthoc"),
    (["train.ema=posthoc", "train.ema_decay=0", "train.posthoc_sigma_rels=[0.05,0.3]"],
     "config key 'train.posthoc_sigma_rels': [0.05, 0.3] must be distinct numbers in (0, 0.2887)"),
    (["train.ema=posthoc", "train.ema_decay=0", "train.posthoc_sigma_rels=[]"], "config key 'train.posthoc_sigma_rels'"),
    (["train.ema=posthoc", "train.ema_decay=0", "train.posthoc_snapshot_every=0"],
     "config key 'train.posthoc_snapshot_every': 0 must be a finite number > 0"),
    (["train.ema=posthoc"], "config key 'train.ema_decay': 0.999 is the fixed EMA's decay; with train.ema=posthoc"),
    (["train.posthoc_snapshot_every=10"], "config key 'train.posthoc_snapshot_every' does nothing with train.ema=fixed"),
])
def test_bad_posthoc_keys_are_one_line_errors(over, message):
    from gentrain.config import load_config
    from gentrain.errors import GentrainError

    with pytest.raises(GentrainError) as e:
        load_config("flow_toy2d", over)
    assert message in str(e.value) and "\n" not in str(e.value)


def tensors(path):
    return {k: v for k, v in load_file(str(path)).items()}


def same(a, b):
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """flow_toy2d with posthoc profiles, 6 steps straight and stopped at 3 + resumed (keep_last=1)."""
    root = tmp_path_factory.mktemp("posthoc")
    args = ["train", "flow_toy2d", *POSTHOC, f"run.output_dir={root}"]
    ok(run_cli(*args, "run.name=straight"))
    ok(run_cli(*args, "run.name=split", "--stop-at", "3"))
    r = ok(run_cli(*args, "run.name=split", "--resume", "auto"))
    assert "resumed from" in r.stderr and "step_3" in r.stderr
    return root


def test_stop_resume_is_bitwise_with_profiles_and_snapshots_survive_pruning(runs):
    straight, split = runs / "straight", runs / "split"
    for run in (straight, split):   # keep_last=1 pruned every checkpoint but the last, no snapshot
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_6"]
        assert sorted(p.name for p in (run / "ema_snapshots").iterdir()) == [
            "step_2.safetensors", "step_4.safetensors", "step_6.safetensors"]
    losses = lambda run: {r["step"]: r["loss/main"] for r in read_metrics(run) if "loss/main" in r}  # noqa: E731
    assert losses(split) == losses(straight)
    for f in ("model.safetensors", "ema_velocity.safetensors", "posthoc_velocity.safetensors"):
        assert same(tensors(straight / "checkpoints/step_6" / f), tensors(split / "checkpoints/step_6" / f)), f
    for step in (2, 4, 6):
        a, b = (run / "ema_snapshots" / f"step_{step}.safetensors" for run in (straight, split))
        assert same(tensors(a), tensors(b)), step
    state = json.loads((straight / "checkpoints/step_6/trainer_state.json").read_text())
    assert state["ema"]["velocity"] == {"kind": "posthoc", "t": 6, "sigma_rels": [0.05, 0.1]}
    # the two profiles differ (two lengths), and the first is the checkpoint's EMA
    snap = tensors(straight / "ema_snapshots/step_6.safetensors")
    ema = tensors(straight / "checkpoints/step_6/ema_velocity.safetensors")
    assert same({k: snap[f"velocity/0/{k}"] for k in ema}, ema)
    assert any(not snap[f"velocity/0/{k}"].equal(snap[f"velocity/1/{k}"]) for k in ema)


def test_gentrain_ema_writes_an_ema_that_sample_eval_and_export_use(runs, tmp_path):
    run = runs / "straight"
    snap = tensors(run / "ema_snapshots/step_4.safetensors")
    for i, sigma in enumerate((0.05, 0.1)):   # a stored length at step 4 returns that profile
        out = tmp_path / f"e{sigma}"
        r = ok(run_cli("ema", str(run), "--sigma-rel", str(sigma), "--step", "4", "--out", str(out)))
        summary = json.loads(r.stdout)
        assert summary["step"] == 4 and summary["snapshots"] == 2 and summary["residual"]["velocity"] < 1e-6
        rec = tensors(out / "ema_velocity.safetensors")
        for k, v in rec.items():
            stored = snap[f"velocity/{i}/{k}"]
            assert (v - stored).abs().max() <= 1e-6 * max(stored.abs().max(), 1e-3), k
    out = tmp_path / "e0.07"
    ok(run_cli("ema", str(run), "--sigma-rel", "0.07", "--out", str(out)))
    assert json.loads((out / "posthoc_ema.json").read_text())["raw_weights_from"] == str(run / "checkpoints/step_6")
    r = ok(run_cli("sample", str(run), "--checkpoint", str(out), "-n", "8", "--out", str(tmp_path / "s.png")))
    assert json.loads(r.stdout)["checkpoint"] == str(out)
    r = ok(run_cli("eval", str(run), "--checkpoint", str(out), "--num-samples", "100"))
    assert "eval/energy_distance" in json.loads(r.stdout)
    ok(run_cli("export", str(run), "--checkpoint", str(out), "--out", str(tmp_path / "x")))
    assert json.loads((tmp_path / "x" / "gentrain_export.json").read_text())["weights"] == "ema"


def test_sweep_prints_the_eval_curve_over_lengths(runs, tmp_path):
    """--sweep evaluates each length as `gentrain eval` does: at the first stored length (the run's own
    EMA while training) it gives the run's plain eval."""
    run = runs / "straight"
    r = ok(run_cli("ema", str(run), "--sweep", "0.05,0.12", "--num-samples", "100", "--out", str(tmp_path / "sw")))
    curve = json.loads(r.stdout)["curve"]
    assert [c["sigma_rel"] for c in curve] == [0.05, 0.12] and json.loads(r.stdout)["step"] == 6
    plain = json.loads(ok(run_cli("eval", str(run), "--num-samples", "100")).stdout)
    assert curve[0]["eval/energy_distance"] == pytest.approx(plain["eval/energy_distance"], rel=1e-4)
    assert curve[1]["eval/energy_distance"] != pytest.approx(plain["eval/energy_distance"], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["sigma_rel_0.05", "sigma_rel_0.12"]


def test_gentrain_ema_refuses_bad_input_in_one_line_and_leaves_nothing(runs, tmp_path):
    run = runs / "straight"
    cases = [(["--sigma-rel", "0.3"], "--sigma-rel 0.3: must be in (0, 0.2887)"),
             (["--sigma-rel", "0.1", "--step", "3"], "--step 3: no EMA snapshot at that step; snapshots: 2, 4, 6"),
             (["--sweep", "0.05,0.3"], "--sweep '0.05,0.3': the lengths must be distinct, each in (0, 0.2887)"),
             (["--sweep", "0.05,x"], "--sweep '0.05,x': expected numbers separated by commas"),
             (["--sigma-rel", "0.1", "--sweep", "0.05"], "give one of --sigma-rel X (with --out DIR) or --sweep")]
    for extra, message in cases:
        out = tmp_path / "never"
        r = run_cli("ema", str(run), *extra, "--out", str(out))
        assert r.returncode == 2 and f"gentrain: error: {message}" in r.stderr and "Traceback" not in r.stderr
        assert not out.exists()
    fixed = tmp_path / "fixed"   # what a train.ema=fixed run holds of snapshots: none
    (fixed / "checkpoints").mkdir(parents=True)
    r = run_cli("ema", str(fixed), "--sigma-rel", "0.1", "--out", str(tmp_path / "never"))
    assert r.returncode == 2 and "has no EMA snapshots" in r.stderr and "train.ema=posthoc" in r.stderr
    assert not (tmp_path / "never").exists()
