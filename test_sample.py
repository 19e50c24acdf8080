"""Tests of sample.py and run.generate: `.venv/bin/python -m pytest -q test_sample.py` (CPU, seconds). An image
depends on its seed only, not on the batch it is drawn in; --denoise-from starts from the image at the right noise
level, writes its grid and refuses a bad T in one line; the default size condition describes the whole dataset."""
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail at once, never retry

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import diffusion  # noqa: E402
import models  # noqa: E402
import run  # noqa: E402
from diffusion import Schedule  # noqa: E402


def test_sample_seed_invariance(fp32_tol, one_thread, train_spec):
    torch.manual_seed(0)
    _, a = train_spec(["--resolution", "16", "--patch-size", "4"])
    model = models.build_model(**a["model"])
    with torch.no_grad():  # a fresh model outputs exactly 0: give it random weights so the test means something
        for p in model.parameters():
            p.normal_(0, 0.05)
    seeds, labels = list(range(100, 108)), [i % 10 for i in range(8)]
    kw = dict(steps=4, cfg=1.5, control_cfg=1.375)
    with one_thread():
        big = run.generate(model, a, seeds, labels, batch_size=8, **kw)
        one = run.generate(model, a, seeds, labels, batch_size=1, **kw)
        alone = run.generate(model, a, [seeds[3]], [labels[3]], batch_size=1, **kw)  # drawn on its own
    assert big.shape == (8, 3, 16, 16)
    tol = fp32_tol(big, ulps=256)  # fp32 rounding: batch size changes how matmuls block, over 4 guided steps
    torch.testing.assert_close(one, big, atol=tol, rtol=0)
    torch.testing.assert_close(alone[0], big[3], atol=tol, rtol=0)
    assert (big[0] - big[1]).abs().max() > 1e-2, "different seeds must give different images"


def test_sample_denoise_from(tmp_path, fast_flags, fp32_tol, one_thread, repo_dir, run_script, script_env, train_spec):
    # generate(images=, t_start=): a fresh model predicts eps = 0 exactly, so DDIM returns the start divided by
    # sqrt(abar) of its first step, i.e. x0 + sigma_t0 * noise(seed): checks the noise level and the per-seed noise
    torch.manual_seed(0)
    _, a = train_spec(["--resolution", "16", "--patch-size", "4", "--no-tiny-recipe"])  # DDPM-eps, as the paper
    model = models.build_model(**a["model"])
    ds = data.build_dataset("embedded", resolution=16)
    b = data.collate([ds[i] for i in range(3)])
    seeds = [5, 6, 7]
    with one_thread():
        out = run.generate(model, a, seeds, b["y"].tolist(), phi=b["phi"], steps=50, cfg=1.0,
                              images=b["image"], t_start=60)
    t0 = int(diffusion.sampling_timesteps(50, 60)[0])
    noise = torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
    want = (b["image"] + Schedule().sigma[t0] * noise).clamp(-1, 1)
    torch.testing.assert_close(out, want, atol=fp32_tol(want, 84), rtol=0)  # fp32 rounding of x_t and its decode
    # the CLI on a 1-step checkpoint: a 2-row grid (crops over results), and a clear error for a bad T
    run_script(["train.py", *fast_flags, "--max-steps", "1", "--out-dir", str(tmp_path)])
    run_script(["sample.py", "--ckpt", str(tmp_path / "ckpt.pt"), "--denoise-from", "300", "--seeds", "0-3",
                "--steps", "5", "--no-save-images"])
    grid = Image.open(tmp_path / "samples" / "denoise_from_300.png")
    assert grid.size == (4 * 18 + 2, 2 * 18 + 2)
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "ckpt.pt"), "--denoise-from", "1000"],
                       cwd=repo_dir, env=script_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--denoise-from 1000" in r.stderr and "Traceback" not in r.stderr


def test_default_size_condition_spans_the_data(tmp_path, train_spec):
    # sample.py's default φ was the median original size of the first 64 items, all of class 0 in an image
    # folder; it must describe the whole dataset (here 70 small class-0 images, 140 larger class-1 ones)
    for c, (n, side) in enumerate(((70, 20), (140, 40))):
        d = tmp_path / f"c{c}"
        d.mkdir()
        for i in range(n):
            Image.new("RGB", (side, side), (40 * c, 90, 20)).save(d / f"{i:03d}.png")
    _, spec = train_spec(["--data", "imagefolder", "--data-path", str(tmp_path), "--resolution", "16"])
    assert spec["data"]["orig_size"] == [40.0, 40.0]
    assert run.default_phi(spec, 1)[0, 3:].tolist() == [40.0, 40.0]
