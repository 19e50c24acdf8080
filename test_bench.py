"""Tests of bench.py: `.venv/bin/python -m pytest -q test_bench.py` (CPU, a few minutes). Counted FLOPs against the
formula; the CLI's suites at tiny size (train step, ours vs diffusers, the CPU budget, Tab. A1 FLOPs on meta
tensors); one real-size `--recipe ours --size B` step through the real pipeline on 1 and 2 gloo ranks (bench.py
--suite scale; the image path and the XL forwards with RUN_SLOW=1); the memory plan's batch rule; and --suite
gpu-train's plan, command and report, run at tiny size."""
import json
import math
import os
import shlex
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail at once, never retry

import pytest  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402
import conditioning  # noqa: E402
import data  # noqa: E402
import latents  # noqa: E402
import models  # noqa: E402
import run  # noqa: E402
import train  # noqa: E402


# ----------------------------------------------------------------------------- bench.py

def test_flops_counter_matches_formula():
    """Tiny DiT, 16x16x4 latent, patch 2 -> N = 64 tokens. Forward FLOPs (2 per multiply-add):
    per token: patch conv 2*C*p*p*D, per block qkv 2*3D^2 + proj 2*D^2 + MLP 2*8D^2, final linear 2*D*p*p*C;
    per block attention q@k^T and attn@v 2*2*N^2*D; per image (not per token): t-MLP 2*(256*D + D^2),
    adaLN 2*6D^2 per block, final adaLN 2*2D^2. Backward: 2x every matmul except the input-gradients nobody
    needs (patch conv, t-MLP's first layer), attention 2.5x (the kernel recomputes q@k^T)."""
    torch.manual_seed(0)
    cfg, B, C, n, p = models.SIZES["tiny"], 2, 4, 16, 2
    D, L, N = cfg["hidden"], cfg["depth"], (n // p) ** 2
    model = models.build_model("dit", "tiny", input_size=n, in_channels=C, num_classes=10)
    x, t, y = torch.randn(B, C, n, n), torch.randint(0, 1000, (B,)), torch.randint(0, 10, (B,))
    fwd, total = bench.count_flops(lambda: model(x, t, {"y": y}).square().mean())
    tok = 2 * N * (C * p * p * D + L * 12 * D * D + D * p * p * C)
    attn = L * 4 * N * N * D
    img = 2 * (256 * D + D * D + L * 6 * D * D + 2 * D * D)
    no_input_grad = 2 * N * C * p * p * D + 2 * 256 * D
    want_fwd, want_total = B * (tok + attn + img), B * (3 * (tok + img) + 3.5 * attn - no_input_grad)
    assert abs(fwd / want_fwd - 1) < 0.05, (fwd, want_fwd)
    assert abs(total / want_total - 1) < 0.05, (total, want_total)
    # attention is a large share at this size: a counter that misses the CPU SDPA kernel must fail
    assert B * attn > 0.1 * want_fwd


def test_bench_cli_smoke(tmp_path, monkeypatch):
    torch.manual_seed(0)
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--arch", "dit", "--size", "tiny", "--resolution", "64",
                                      "--batch", "2", "--steps", "2", "--warmup", "1", "--device", "cpu",
                                      "--out", str(out)])
    bench.main()
    rep = json.loads(out.read_text())
    assert {"config", "device", "torch", "rows"} <= set(rep)
    row = rep["rows"][0]
    assert set(bench.TRAIN_COLS) <= set(row)
    assert row["step_ms"] > 0 and row["img_per_s"] > 0 and row["sample_step_ms"] > 0
    assert 2.5 < row["train_gflops_per_img"] / row["fwd_gflops_per_img"] < 4  # backward ~ 2x forward
    assert row["mfu"] is None  # no known peak on a CPU
    # the ours-vs-diffusers suite on the same tiny shapes, one pair
    monkeypatch.setattr(sys, "argv", ["bench.py", "--suite", "cpu-compare", "--size", "tiny", "--resolution", "64",
                                      "--batch", "2", "--reps", "1", "--warmup", "0", "--compare-archs", "dit",
                                      "--compare-dtypes", "fp32", "--device", "cpu", "--out", str(out)])
    bench.main()
    row = json.loads(out.read_text())["rows"][0]
    assert set(bench.COMPARE_COLS) <= set(row) and row["ratio"] > 0
    # the CPU budget: the reference step (the first default: pixels, 24 px, batch 32) and the budget it implies, 10 x 2.5 / rate
    monkeypatch.setattr(sys, "argv", ["bench.py", "--suite", "cpu-default", "--threads", "1", "--out", str(out)])
    bench.main()
    row = json.loads(out.read_text())["rows"][0]
    assert (row["resolution"], row["batch"], row["arch"]) == (24, 32, "mmdit")
    assert row["steps_per_s"] == pytest.approx(1e3 / row["step_ms"]) and row["budget_min"] == pytest.approx(
        bench.BUDGET_MIN * bench.REF_STEPS_PER_S / row["steps_per_s"])
    # the Tab. A1 counterpart runs on meta tensors: every arch, both resolutions, 4x the tokens -> > 4x the FLOPs
    monkeypatch.setattr(sys, "argv", ["bench.py", "--suite", "flops", "--size", "tiny", "--out", str(out)])
    bench.main()
    rows = json.loads(out.read_text())["rows"]
    assert {r["arch"] for r in rows} == set(models.MODELS)
    assert all(r["gflops_512"] > 4 * r["gflops_256"] > 0 for r in rows if r["arch"] != "unet")


# ----------------------------------------------------------------------------- real-size parts (bench.py --suite scale)
# stabilityai/sd-vae-ft-ema (diffusers AutoencoderKL, its config.json = latents.SD_VAE_CONFIG): 83.65 M parameters
_SD_VAE_PARAMS = 83_653_863
# open_clip ViT-L-14's text tower, counted from its config (width 768, 12 layers, MLP 3072, vocab 49408, 77 tokens):
# token + position embeddings, 12 x (qkv + out projection with biases, 2 LayerNorms, MLP), ln_final, the 768 x 768
# text projection, and CLIP's logit scale
_D, _L = 768, 12
_CLIP_L_TEXT_PARAMS = (49408 * _D + 77 * _D + _L * (4 * _D * _D + 4 * _D + 4 * _D + 2 * 4 * _D * _D + 4 * _D + _D)
                       + 2 * _D + _D * _D + 1)
_slow = pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="real-size runs beyond the suite's 10 minutes: "
                           "RUN_SLOW=1 (bench.py --suite scale runs them all)")


def _spy_parts(monkeypatch):
    """Record what train.py's pipeline feeds the denoiser: the VAE and its latents, the text tower and its tokens."""
    seen = {"vae": set(), "latent": [], "tower": set(), "text": [], "pad": []}
    encode, encode_text = latents.encode, conditioning.encode_text

    def spy_encode(vae, images, *a, **kw):
        z = encode(vae, images, *a, **kw)
        seen["vae"].add(sum(p.numel() for p in vae.parameters()))
        seen["latent"].append(tuple(z.shape))
        return z

    def spy_text(encoder, captions, padding="replicate", *a, **kw):
        out = encode_text(encoder, captions, padding, *a, **kw)
        seen["tower"].add(sum(p.numel() for p in encoder.parameters()))
        seen["text"].append(tuple(out["text"].shape))
        seen["pad"].append(padding)
        return out
    monkeypatch.setattr(latents, "encode", spy_encode)
    monkeypatch.setattr(conditioning, "encode_text", spy_text)
    return seen


@pytest.mark.parametrize("path", [pytest.param("image", marks=_slow), "text"])  # text: every part image has, + CLIP
def test_scale_step(tmp_path, monkeypatch, path):
    """One `--recipe ours --size B` step at 256 px through the real pipeline (JPEG folder of varied sizes or
    img2dataset shards -> SD-VAE architecture [-> CLIP-L, 77 tokens, noisy padding] -> mmDiT-B -> AdamW) in this
    process; the text path then takes the same step on 2 gloo ranks, which must give the same gradient to fp32
    rounding (bench --suite scale compares both paths)."""
    torch.manual_seed(0)
    src = (bench.write_imagefolder(str(tmp_path / "in")) if path == "image"
           else bench.write_wds_shards(str(tmp_path / "shards")))
    seen = _spy_parts(monkeypatch)
    train.main(bench.scale_argv(path, src, str(tmp_path / "one"), ranks=1))
    monkeypatch.undo()
    # the real-size parts were used, at the real shapes
    assert seen["vae"] == {_SD_VAE_PARAMS}
    assert seen["latent"] == [(1, 4, 32, 32)] * 2  # 2 micro-steps of 1 image: 256 px -> 32 x 32 x 4
    if path == "text":
        assert seen["tower"] == {_CLIP_L_TEXT_PARAMS}
        assert (1, 77, 768) in seen["text"] and "noisy" in seen["pad"]  # 77 CLIP-L tokens, the recipe's padding
    one = torch.load(tmp_path / "one" / "ckpt.pt", map_location="cpu", weights_only=False, mmap=True)
    spec = one["spec"]
    assert spec["model"]["arch"] == "mmdit" and spec["model"]["size"] == "B" and spec["model"]["input_size"] == 32
    assert spec["latent"] == dict(vae="sd-random", scale=data.VAE_SCALE, channels=4, down=8)
    assert sum(v.numel() for v in one["model"].values()) > 100e6  # mmDiT-B/2
    assert math.isfinite(_last_loss(tmp_path / "one"))
    fresh = models.build_model(**spec["model"]).state_dict()
    moved = max((one["model"][k] - fresh[k]).abs().max().item() for k in fresh if "final" in k)
    assert moved > 1e-4, "the step did not change the weights: the comparison below would be vacuous"
    if path == "image":  # the 2-rank comparison runs on the text path, which holds every part the image path has
        return
    # 2 gloo ranks x 1 image = the same global batch, the same chunks and noise
    bench.run_train(bench.scale_argv(path, src, str(tmp_path / "two"), ranks=2), ranks=2)
    two = torch.load(tmp_path / "two" / "ckpt.pt", map_location="cpu", weights_only=False, mmap=True)
    # the gradient of the step: AdamW's first moment after one step is (1 - beta1) * g for every parameter; gloo
    # sums the 2 ranks' gradients in another order than 2 micro-steps do, so they agree to fp32 rounding of the
    # tensor's largest entry
    s1, s2 = one["optimizer"]["state"], two["optimizer"]["state"]
    assert s1.keys() == s2.keys() and len(s1) == len(list(models.build_model(**spec["model"]).parameters()))
    for i in s1:
        m1, m2 = s1[i]["exp_avg"], s2[i]["exp_avg"]
        tol = 16 * torch.finfo(torch.float32).eps * m1.abs().max().item()
        assert (m1 - m2).abs().max().item() <= tol, f"parameter {i}: the 2-rank gradient != the 1-process one"
    # the weights: the first AdamW step moves w by lr * g / (|g| + eps); where |g| is near eps (1e-8) fp32 rounding
    # of g can move that by up to lr, so the weights are held to lr, the gradients above to rounding
    lr = one["args"]["lr"]
    for part in ("model", "ema"):
        for k, v in one[part].items():
            assert (v - two[part][k]).abs().max().item() <= lr, f"{part}.{k}: 2 ranks != 1 process"
    assert math.isclose(_last_loss(tmp_path / "one"), _last_loss(tmp_path / "two"), rel_tol=1e-5)


def _last_loss(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return json.loads(f.readlines()[-1])["loss"]


@_slow
@pytest.mark.parametrize("arch", list(models.MODELS))
def test_scale_xl_forward(arch):
    """bench --suite scale's forward part: arch-XL/2 at 256 px through the SD-VAE architecture and the CLIP-L
    tower; finite output, parameters and FLOPs of the paper's scale (Tab. A1 within 10 % where it gives a number)."""
    rows = bench.scale_forwards([arch])
    assert round(rows[0]["params_M"] * 1e6) == _SD_VAE_PARAMS and round(rows[1]["params_M"] * 1e6) == _CLIP_L_TEXT_PARAMS
    for r in rows[2:]:
        assert 300 < r["params_M"] < 1500 and r["gflops"] > 50
        if r["paper_gflops"]:
            assert abs(r["gflops"] / r["paper_gflops"] - 1) < 0.1, r


# ----------------------------------------------------------------------------- memory plan; bench.py --suite gpu-train

def test_memory_plan_rule():
    """plan_card: the largest micro-batch dividing the per-card batch that fits PLAN_FILL of the card less
    PLAN_RESERVE; None when one image does not fit."""
    m = dict(global_batch=256, fixed_gib=10.0, act_gib=1.0)
    room = run.PLAN_FILL * (40.0 - run.PLAN_RESERVE) - 10.0  # 24.2 GiB: 24 images, 16 divides 32
    assert 16 <= room < 32
    assert bench.plan_card(m, 40.0, gpus=8) == (16, 2, 26.0)
    assert bench.plan_card(m, 40.0, gpus=16) == (16, 1, 26.0)
    assert bench.plan_card(dict(m, act_gib=100.0), 40.0) is None
    assert bench.plan_card(dict(m, act_gib=5.0), 40.0, gpus=8) == (4, 8, 30.0)  # 4.84 fit, 4 divides 32


def test_gpu_train_ready(tmp_path, monkeypatch, capsys):
    """bench --suite gpu-train: off CUDA it prints the plan and the train.py command for an H200 (the paper's recipe
    at XL, the plan's batch split, compiled); the command's data and report run here at tiny size on synthetic
    latents: finite loss, img/s, the hours-per-100k arithmetic."""
    monkeypatch.setattr(sys, "argv", ["bench.py", "--suite", "gpu-train", "--device", "cpu", "--out", str(tmp_path / "g.json")])
    bench.main()
    out = capsys.readouterr().out
    m = bench.measure_memory(bench.PLAN_RUNS["ImageNet-1k 256 (class)"])
    micro, accum, planned = bench.plan_card(m, bench.CARDS["H200"])
    assert f"micro {micro} x grad-accum {accum}, planned {planned:.1f} GiB" in out
    argv = shlex.split(out.split(" train.py ")[1].splitlines()[0])
    a = vars(train.parse_args(argv))
    assert (a["recipe"], a["size"], a["data"], a["compile"], a["max_steps"]) == ("ours", "XL", "latents", True, 120)
    assert a["global_batch"] == 2048 // bench.PLAN_GPUS and a["grad_accum"] == accum and a["resolution"] == 256
    assert a["ckpt_every"] == 0  # no 21 GB checkpoint unless --save-ckpt
    # the same pipeline at tiny size: synthetic latents in extract_latents' format -> train.py -> the report
    meta = latents.synthetic_latents(str(tmp_path / "lat"), n=12, resolution=32, num_classes=10, shard_size=5)
    assert meta["shards"] == 3 and data.LatentDataset(str(tmp_path / "lat"))[11]["latent"].shape == (4, 4, 4)
    train.main(["--size", "tiny", "--data", "latents", "--data-path", str(tmp_path / "lat"), "--global-batch", "4",
                "--max-steps", "3", "--log-every", "1", "--sample-every", "0", "--no-progress", "--device", "cpu",
                "--ckpt-every", "0", "--out-dir", str(tmp_path / "run")])
    assert not any(f.endswith((".pt", ".safetensors")) for f in os.listdir(tmp_path / "run"))  # --ckpt-every 0
    row = bench.gpu_train_report(str(tmp_path / "run" / "log.jsonl"), "cpu", None, m["global_batch"])
    assert row["steps"] == 3 and row["finite"] and row["img_per_s"] > 0
    assert row["hours_per_100k"] == pytest.approx(100_000 * 2048 / (bench.PLAN_GPUS * row["img_per_s"]) / 3600, rel=1e-12)
