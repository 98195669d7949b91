"""bench/gpu_step.py's CPU-size mode: the GPU check's code path (nets built from the presets,
bare loop and gentrain's Trainer, FLOPs and utilisation, JSON out) runs in CI, so it is ready the
day a GPU machine is lent. Tiny widths: the figures mean nothing, their presence and sanity do."""
import json
import subprocess
import sys

import pytest

from conftest import cli_env, ok, REPO

pytestmark = pytest.mark.speed


def test_gpu_step_tiny_mode_runs_both_nets_bare_and_in_the_trainer(tmp_path):
    out = tmp_path / "gpu_step.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_step.py"), "--tiny", "--seconds", "0.5",
                        "--variants", "bf16_autocast,trainer+bf16_autocast", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=cli_env(), cwd=REPO)
    ok(r)
    res = json.loads(out.read_text())
    nets = ("sd_unet", "sd15_unet", "dit_b2")
    assert res["tiny"] and set(res["flops"]) == set(nets)
    rows = {(x["net"], x["variant"]): x for x in res["rows"]}
    diffusers = rows.pop(("sd15_unet", "diffusers_train_text_to_image"))   # SD 1.5 as diffusers' script trains it
    assert diffusers["images_s"] > 0 and diffusers["gentrain_vs_diffusers"] > 0, diffusers
    assert set(rows) == {(n, v) for n in nets for v in ("bf16_autocast", "trainer+bf16_autocast")}
    # the bf16 matmul is a ceiling only where the machine has a bf16 kernel: a CPU with AVX2 only ran
    # it at 0.34 GFLOP/s against 114 in fp32 (2026-12-03), and bf16 convolutions beat that "peak"
    peak = res["matmul_peak_tflops"]
    real_bf16 = peak["bf16"] >= peak["fp32"] / 4
    for (net, variant), x in rows.items():
        assert x["images_s"] > 0 and x["utilisation"] > 0 and x["steps_timed"] >= 3, x
        assert x["utilisation"] < 1 or not real_bf16, (x, peak)
        assert x["model_flops_per_step"] == res["flops"][net]["total"] > 0
    for net in nets:
        assert rows[(net, "trainer+bf16_autocast")]["trainer_vs_bare"] > 0
    assert res["flops"]["sd_unet"]["attention_added"] > 0     # SDPA counted by hand on CPU
