"""The offline digits evaluator: a tiny CPU classifier on sklearn's digits and the Frechet distance
on its features (a digits-classifier FD, not Inception FID)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gentrain.eval.digits import (DigitsEvaluator, _split, default_evaluator, evaluate_images, frechet,
                                            real_digits)


@pytest.fixture(scope="module")
def ev16():
    return DigitsEvaluator.fit(16, seed=0)


@pytest.fixture(scope="module")
def real16():
    return real_digits(16)


def _pair(x, n=500, seed=1):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:n]], x[perm[n:2 * n]]


def _blur(x, sigma):
    k = torch.exp(-torch.arange(-3, 4).float() ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, 7)
    y = F.conv2d(F.pad(x + 1, (3, 3, 0, 0)), k)
    return F.conv2d(F.pad(y, (0, 0, 3, 3)), k.transpose(2, 3)) - 1


def test_real_digits_are_what_the_shards_hold():
    from PIL import Image
    from sklearn.datasets import load_digits

    from gentrain.data_pipeline.batches import collate
    from gentrain.data_pipeline.decode import DecodeOptions, decode_sample
    from gentrain.data_pipeline.sources import digits_samples

    for size, channels, shard_size in ((16, 1, None), (32, 3, None), (16, 3, 32)):
        x, y = real_digits(size, channels, shard_size)
        assert x.shape == (1797, channels, size, size) and x.dtype == torch.float32 and y.shape == (1797,)
        raw = [{**s, "txt": s["txt"].encode(), "png": s["png"]} for s in digits_samples(size=shard_size or size)]
        batch = collate([decode_sample(r, DecodeOptions(image_size=size, channels=channels)) for r in raw])
        assert torch.equal(batch["image"], x) and torch.equal(batch["label"], y)
    # independently of the pipeline: bicubic upscale of 0..16 -> 0..255 grey, white ink on black
    d = load_digits()
    x, y = real_digits(16)
    for i in (0, 5, 1796):
        px = np.clip(d.images[i] * (255 / 16), 0, 255).astype(np.uint8)
        ref = np.asarray(Image.fromarray(px, "L").resize((16, 16), Image.BICUBIC), np.float32) / 127.5 - 1
        assert np.array_equal(x[i, 0].numpy(), ref) and y[i] == d.target[i]
    assert x[:, :, 0, 0].max() == -1 and x.amax((1, 2, 3)).min() > 0.5  # black corners, bright ink
    x3 = real_digits(16, 3)[0]
    assert torch.equal(x3[:, 0], x3[:, 1]) and torch.equal(x3[:, 0], x[:, 0])


def test_heldout_accuracy_and_predict(ev16, real16):
    x, y = real16
    tr, held = _split(y, 0)
    assert len(set(tr.tolist()) & set(held.tolist())) == 0 and len(tr) + len(held) == 1797
    assert 300 < len(held) < 400 and torch.bincount(y[held]).min() >= 30  # stratified 20%
    acc = (ev16.predict(x[held]) == y[held]).float().mean().item()
    assert acc == pytest.approx(ev16.accuracy) and ev16.accuracy >= 0.97
    assert (ev16.predict(x) == y).float().mean() >= 0.98
    assert ev16.features(x[:7]).shape == (7, 64)


def test_frechet_matches_closed_forms():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.normal(size=4), rng.normal(size=4), rng.uniform(0.1, 3, 4), rng.uniform(0.1, 3, 4)
    diag = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(diag, rel=1e-9)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T, m2 @ m2.T
    ref = ((mu1[:1] - mu2[:1]) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert frechet(np.r_[mu1[:1], np.zeros(5)], s1, np.r_[mu2[:1], np.zeros(5)], s2) == pytest.approx(ref, rel=1e-6)
    assert frechet(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)


def test_fd_orders_corruptions(ev16, real16):
    a, b = _pair(real16[0])
    rr = ev16.frechet_distance(a, b)
    noise = torch.rand(b.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_noise = ev16.frechet_distance(a, noise)
    assert rr < 60 and fd_noise > 25 * rr
    blurs = [ev16.frechet_distance(a, _blur(b, s)) for s in (1.0, 2.0, 3.0)]
    shifts = [ev16.frechet_distance(a, torch.roll(b, (d, d), (2, 3))) for d in (1, 2, 3)]
    for fds in (blurs, shifts):
        assert rr < fds[0] < fds[1] < fds[2] < fd_noise, (rr, fds, fd_noise)
    assert ev16.real_vs_real_fd(500, 1) == pytest.approx(rr)  # same disjoint split by seed
    assert ev16.real_vs_real_fd(500, 2) != pytest.approx(rr)
    assert ev16.frechet_distance(a[:3], b[:3]) > 0  # small N: eps keeps it finite
    with pytest.raises(ValueError):
        ev16.real_vs_real_fd(899)


def test_evaluate_images(ev16, real16):
    x, y = real16
    _, held = _split(y, 0)
    out = ev16.evaluate_images(x[held], y[held])
    assert out["n_ref"] == len(held) and out["classifier_heldout_accuracy"] == ev16.accuracy
    assert out["accuracy"] == pytest.approx(ev16.accuracy) and out["fd"] < 3 * out["fd_real_vs_real"]
    wrong = ev16.evaluate_images(x[held], (y[held] + 1) % 10)
    assert wrong["accuracy"] < 0.05 and wrong["fd"] == out["fd"]
    noise = torch.rand(1000, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = ev16.evaluate_images(noise, torch.zeros(1000, dtype=torch.long), seed=3)
    assert out["n_ref"] == 898 and out["fd"] > 25 * out["fd_real_vs_real"] and "accuracy" in out
    assert evaluate_images(x[:50], evaluator=ev16) == ev16.evaluate_images(x[:50])
    x8, y8 = real_digits(8)
    out8 = evaluate_images(x8[:400], y8[:400], seed=1)  # fits the 8 px evaluator once per process
    assert default_evaluator(8) is default_evaluator(8) and out8["accuracy"] > 0.95 and out8["n_ref"] == 400


def test_three_channels_and_bad_shapes(ev16, real16):
    x, y = real16
    x3 = real_digits(16, 3)[0]
    torch.testing.assert_close(ev16.features(x3), ev16.features(x), atol=1e-4, rtol=0)
    assert torch.equal(ev16.predict(x3), ev16.predict(x))
    colour = torch.cat([x3[:50, :1], -torch.ones(50, 1, 16, 16), x3[:50, :1] * 0.5], 1)  # averaged, not channel 0
    torch.testing.assert_close(ev16.features(colour), ev16.features(x[:50] * 0.5 - 1 / 3), atol=1e-4, rtol=0)
    a, b = _pair(x, 300)
    a3, _ = _pair(x3, 300)
    assert ev16.frechet_distance(a3, b) == pytest.approx(ev16.frechet_distance(a, b), rel=1e-3)
    assert torch.equal(ev16.predict(x[:20].numpy()), ev16.predict(x[:20]))  # numpy input
    for bad in (torch.zeros(4, 1, 32, 32), torch.zeros(4, 2, 16, 16), torch.zeros(16, 16)):
        with pytest.raises(ValueError):
            ev16.features(bad)


def test_fit_is_deterministic_for_a_seed():
    e1, e2, e3 = DigitsEvaluator.fit(8, seed=3), DigitsEvaluator.fit(8, seed=3), DigitsEvaluator.fit(8, seed=4)
    s1, s2, s3 = e1.net.state_dict(), e2.net.state_dict(), e3.net.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1) and e1.accuracy == e2.accuracy
    assert not torch.equal(s1["feat.weight"], s3["feat.weight"])
    assert e1.accuracy >= 0.95 and e3.accuracy >= 0.95  # 8 px is the hardest resolution


def test_save_load_round_trip(ev16, real16, tmp_path, monkeypatch):
    from safetensors import safe_open

    path = tmp_path / "ev" / "digits16.safetensors"
    ev16.save(str(path))
    with safe_open(str(path), framework="pt") as f:  # plain safetensors, settings as JSON metadata
        meta = json.loads(f.metadata()["gentrain"])
    assert meta["size"] == 16 and meta["seed"] == 0 and meta["accuracy"] == ev16.accuracy
    ev = DigitsEvaluator.load(str(path))
    assert torch.equal(ev.features(real16[0]), ev16.features(real16[0]))
    assert (ev.size, ev.seed, ev.accuracy) == (16, 0, ev16.accuracy)
    assert ev.real_vs_real_fd(200, 5) == ev16.real_vs_real_fd(200, 5)
    monkeypatch.setattr(DigitsEvaluator, "fit", classmethod(lambda *a, **k: pytest.fail("refit")))
    assert torch.equal(DigitsEvaluator.cached(str(path), 16, 0).features(real16[0][:9]), ev16.features(real16[0][:9]))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError):
        DigitsEvaluator.load(str(tmp_path / "other.safetensors"))


def test_text_to_image_fd_is_the_mean_over_seeds(real16):
    """evaluate_text_to_image_digits: accuracy per prompt form at eval.seed, FD and real-vs-real as
    the mean over eval.fd_seeds seeds (fresh samples and real sets per seed)."""
    from types import SimpleNamespace

    from gentrain.data_pipeline.sources import DIGIT_WORDS
    from gentrain.eval.metrics import evaluate_text_to_image_digits, sample_digit_prompts

    x, y = real16

    class RealDigits:  # "samples" real digits of the prompted label, drawn with the generator
        device, guidance_scale = torch.device("cpu"), 3.0

        def sample(self, n, cond, generator=None, guidance_scale=None):
            out = []
            for p in cond["prompts"]:
                last = p.split()[-1]
                label = int(last) if last.isdigit() else DIGIT_WORDS.index(last)
                idx = torch.nonzero(y == label).flatten()
                out.append(x[idx[torch.randint(len(idx), (1,), generator=generator)]])
            return torch.cat(out)

    cfg = SimpleNamespace(eval=SimpleNamespace(num_samples=100, seed=5, fd_seeds=3), data=SimpleNamespace(image_size=16))
    res = evaluate_text_to_image_digits(RealDigits(), cfg)
    assert res["eval/fd_seeds"] == 3 and res["eval/fd_n"] == 100 and res["eval/guidance_scale"] == 3.0
    assert res["eval/accuracy_numeral"] > 0.9 and res["eval/accuracy_word"] > 0.9
    per_seed = [default_evaluator(16).evaluate_images(sample_digit_prompts(RealDigits(), "numeral", 100, s, 3.0), seed=s)
                for s in (5, 6, 7)]
    assert res["eval/fd"] == pytest.approx(np.mean([r["fd"] for r in per_seed]))
    assert res["eval/fd_real_vs_real"] == pytest.approx(np.mean([r["fd_real_vs_real"] for r in per_seed]))
    assert len({round(r["fd"], 6) for r in per_seed}) == 3  # the seeds differ
    cfg.eval.fd_seeds = 1
    assert evaluate_text_to_image_digits(RealDigits(), cfg)["eval/fd"] == pytest.approx(per_seed[0]["fd"])
