"""
Benchmark: training step time, images/s, peak memory, FLOPs per image, MFU and guided sampling step time.

A training step is forward + backward + AdamW step through diffusion.loss_fn, as train.py runs it. FLOPs are
counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; elementwise ops are free),
never by hand formulas. MFU = counted training FLOPs per image * images/s / the card's dense bf16 peak.
The sampling step is one denoiser call with the three guidance branches of Eq. 2 batched (diffusion.guided_eps_fn).

    python bench.py --arch dit --size S --resolution 256 --batch 8 --device cpu     # one configuration
    python bench.py --suite cpu-compare --threads 1 --warmup 1 --reps 7   # DiT / PixArt / mmDiT S/2 vs diffusers
    python bench.py --suite gpu              # DiT-XL/2 and mmDiT-XL/2 at 256 px, bf16, eager and compiled
    python bench.py --suite flops            # paper Tab. A1 cell by cell: params, GFLOPs at 256 / 512 px, beside the paper
    python bench.py --suite cpu-default --threads 2   # the reference CPU step: this machine's share of the CPU budget
    python bench.py --suite scale --threads 2   # real-size SD VAE + CLIP-L (random weights): mmDiT-B steps, XL fwds
    python bench.py --suite memory           # the paper's run on 8 cards: micro-batch and --grad-accum per card
    python bench.py --suite gpu-train        # ours-XL, 200 compiled steps on synthetic latents at the planned batch
"""
import argparse
import functools
import gc
import io
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import conditioning
import latents
import diffusion
import models
import run
from conditioning import CONTROL_SIGNALS
from data import LATENT_CH, VAE_DOWN  # SD VAE: 4 latent channels, 8x down
from run import FLOP_MAP, autocast, count_flops, device_peak  # FLOP counting, shared with train.py's MFU

# ----------------------------------------------------------------------------- constants
NUM_CLASSES = 1000  # ImageNet-1k, for class-conditional archs
TEXT_DIM = POOLED_DIM = 768  # open_clip ViT-L-14 token width and pooled width
TEXT_ARCHS = ("pixart", "mmdit", "unet")  # archs benchmarked text-conditional (the paper's CC12M models)
LAM, BETA = 1.5, 1.375  # guidance of the sampling benchmark (paper: lam 1.5 at 256, beta 1.375 best)
# Paper Tab. A1 cell by cell: (column, cond) -> (params M, GFLOPs @256, GFLOPs @512), as printed (the 512 px
# figures are given to 3 significant digits). The text row's four numbers are UNet, PixArt, mmDiT, Att-DiT. The
# table counts 2 FLOPs per multiply-add, as we do (DiT-XL/2 237.4 = 2 x DiT's 118.6 "Gflops").
TAB_A1_PAPER = {
    ("UNet-SDXL", "class"): (401.75, 95.38, 390), ("UNet-SDXL", "text"): (864.31, 189.78, 819.56),
    ("PixArt-XL/2", "class"): (611.7, 275.14, 1200), ("PixArt-XL/2", "text"): (610.12, 314.68, 1140),
    ("mmDiT-XL/2", "class"): (679.09, 237.93, 1050), ("mmDiT-XL/2", "text"): (791.64, 397.06, 1260),
    ("Att-DiT-XL/2", "class"): (792.44, 237.93, 1050), ("Att-DiT-XL/2", "text"): (940.49, 407.88, 1500),
    ("mdT-XL/2", "class"): (748.07, 259.08, 1140), ("DiT-XL/2", "class"): (679.09, 237.4, 1050),
}
ARCH_COLUMN = {"unet": "UNet-SDXL", "pixart": "PixArt-XL/2", "mmdit": "mmDiT-XL/2", "mdt": "mdT-XL/2",
               "dit": "DiT-XL/2"}  # each arch's own Tab. A1 column (mmdit with a class token: mmDiT-XL/2)


def paper_gflops_256(arch):
    """Tab. A1's class-conditional GFLOPs at 256 px of the arch's column (the scale suite compares class forwards
    only: several text cells differ by design, RESULTS.md "Tab. A1, cell by cell")."""
    return TAB_A1_PAPER[ARCH_COLUMN[arch], "class"][1]


# The CPU budget: `python train.py` + `python sample.py` within 10 min on a 2-core AMD EPYC (Zen 1), where the
# reference job (the first default: mmDiT-tiny, 24 px pixels, batch 32, 10 classes + control, fp32) trains at
# 2.5 steps/s.
# On another machine the budget scales by that job's step rate, which `--suite cpu-default` measures.
REF_JOB = dict(arch="mmdit", size="tiny", resolution=24, batch=32, classes=10)
REF_STEPS_PER_S, BUDGET_MIN = 2.5, 10.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------- helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(arch, B, R, device, control=True, text=None, pixels=False, classes=NUM_CLASSES):
    """Latent x0 (B, 4, R/8, R/8) (pixels: (B, 3, R, R)) and a cond dict: text for TEXT_ARCHS unless text=False."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 3, R, R, generator=g) if pixels else torch.randn(B, LATENT_CH, R // VAE_DOWN, R // VAE_DOWN,
                                                                          generator=g)
    if arch in TEXT_ARCHS if text is None else text:
        cond = {"text": torch.randn(B, 77, TEXT_DIM, generator=g), "pooled": torch.randn(B, POOLED_DIM, generator=g)}
    else:
        cond = {"y": torch.randint(0, classes, (B,), generator=g)}
    if control:  # φ in original-image pixels: an uncropped, flipped R x R original
        cond["phi"] = run.default_phi({"data": {"resolution": R}}, B, flip=True)
        cond["keep_ctrl"] = torch.ones(B)
    return x0.to(device), {k: v.to(device) for k, v in cond.items()}


def build_ours(arch, size, R, control=True, device="cpu", text=None, pixels=False, classes=NUM_CLASSES):
    """Our model for arch/size on an R-pixel image's latent (or its pixels), built directly on device."""
    text = arch in TEXT_ARCHS if text is None else text
    kind = dict(text_dim=TEXT_DIM, pooled_dim=POOLED_DIM) if text else dict(num_classes=classes)
    if "input_size" in models.arch_kwargs(arch):  # transformers; the UNet is fully convolutional
        kind["input_size"] = R if pixels else R // VAE_DOWN
    with torch.device(device):
        return models.build_model(arch, size, in_channels=3 if pixels else LATENT_CH,
                                  control=CONTROL_SIGNALS if control else (), **kind)


def timed(fn, device):
    """(wall seconds, process CPU seconds) of fn(); CPU time is what a loaded shared machine disturbs least."""
    sync(device)
    w, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w, time.process_time() - c


def peak_mem_mb(device, rss0):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # CPU: growth of peak RSS (kB -> MB)


# ----------------------------------------------------------------------------- one configuration
def bench_config(arch, size, R, B, dtype, device, compile=False, steps=10, warmup=3, control=True, sample=True,
                 pixels=False, classes=NUM_CLASSES):
    """Train-step and sampling-step numbers of one (arch, size, resolution, batch, dtype, compile) as a dict."""
    torch.manual_seed(0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_ours(arch, size, R, control, device, text=False if pixels else None, pixels=pixels, classes=classes)
    sched = diffusion.Schedule().to(device)
    x0, cond = make_batch(arch, B, R, device, control, text=False if pixels else None, pixels=pixels, classes=classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.03,
                            fused=device.type == "cuda")
    # FLOPs on the eager model with 2 images (cheap even for XL on a CPU box)
    with autocast(device, dtype):
        two = {k: v[:2] for k, v in cond.items()}
        fwd, total = count_flops(lambda: diffusion.loss_fn(model, sched, x0[:2], two)[0])
    model.zero_grad(set_to_none=True)
    net = torch.compile(model) if compile else model

    def train_step():
        with autocast(device, dtype):
            loss = diffusion.loss_fn(net, sched, x0, cond)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):  # includes compilation
        train_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [timed(train_step, device)[0] for _ in range(steps)]
    step_s = statistics.median(times)
    name, peak = device_peak(device)
    row = dict(arch=arch, size=size, resolution=R, batch=B, dtype=DTYPE_NAMES[dtype], compile=compile,
               device=name, params_M=sum(p.numel() for p in model.parameters()) / 1e6,
               fwd_gflops_per_img=fwd / 2 / 1e9, train_gflops_per_img=total / 2 / 1e9,
               step_ms=step_s * 1e3, img_per_s=B / step_s, peak_mem_mb=peak_mem_mb(device, rss0),
               mfu=total / 2 * B / step_s / peak if peak else None, sample_step_ms=None)
    if sample:  # one guided sampling step: cond / control-dropped / both-dropped stacked into one (3B) call
        del opt
        model.eval()
        cond_s = {**cond, "keep_ctrl": torch.zeros(B, device=device)}
        null = ({"text": torch.zeros_like(cond["text"])} if "text" in cond  # null semantic: empty text / null class
                else {"y": torch.full_like(cond["y"], classes)})
        eps_fn = diffusion.guided_eps_fn(net, cond, cond_s, {**cond_s, **null}, lam=LAM, beta=BETA)
        t = torch.full((B,), 500, device=device, dtype=torch.long)
        with torch.no_grad(), autocast(device, dtype):
            ts = [timed(lambda: eps_fn(x0, t), device)[0] for _ in range(max(1, warmup) + max(1, steps // 2))]
        row["sample_step_ms"] = statistics.median(ts[max(1, warmup):]) * 1e3
    return row


# ----------------------------------------------------------------------------- the CPU budget (cpu-default)
def cpu_default(steps, warmup):
    """The reference training step (REF_JOB) on this machine: steps/s and what the 10-minute CPU budget on
    the 2.5 steps/s reference machine comes to here (budget x 2.5 / steps/s)."""
    j = REF_JOB
    row = bench_config(j["arch"], j["size"], j["resolution"], j["batch"], torch.float32, torch.device("cpu"),
                       steps=steps, warmup=warmup, sample=False, pixels=True, classes=j["classes"])
    rate = 1e3 / row["step_ms"]
    row.update(steps_per_s=rate, budget_min=BUDGET_MIN * REF_STEPS_PER_S / rate)
    return [row]


# ----------------------------------------------------------------------------- diffusers references (cpu-compare)
def build_diffusers(arch, D, depth, heads, n):
    """diffusers' reference of arch at the same width/depth/heads on an n x n latent, and a call(x, t, cond) for it."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
    common = dict(num_attention_heads=heads, attention_head_dim=D // heads, in_channels=LATENT_CH,
                  out_channels=LATENT_CH, num_layers=depth, sample_size=n, patch_size=2)
    if arch == "dit":
        m = DiTTransformer2DModel(num_embeds_ada_norm=NUM_CLASSES, **common)
        return m, lambda x, t, c: m(x, timestep=t, class_labels=c["y"]).sample
    if arch == "pixart":
        m = PixArtTransformer2DModel(cross_attention_dim=D, caption_channels=TEXT_DIM, **common)
        no_extra = {"resolution": None, "aspect_ratio": None}
        return m, lambda x, t, c: m(x, encoder_hidden_states=c["text"], timestep=t, added_cond_kwargs=no_extra).sample
    if arch == "mmdit":  # SD3 with RMSNorm on q/k (SD3.5 style), as ours (§2: q/k RMSNorm)
        m = SD3Transformer2DModel(joint_attention_dim=TEXT_DIM, caption_projection_dim=D,
                                  pooled_projection_dim=POOLED_DIM, pos_embed_max_size=n, qk_norm="rms_norm", **common)
        return m, lambda x, t, c: m(x, encoder_hidden_states=c["text"], pooled_projections=c["pooled"],
                                    timestep=t.float()).sample
    raise ValueError(f"no diffusers reference for {arch!r}")


def fwd_bwd(fn, x0, t, cond, dtype, params):
    """One forward + backward of a denoiser call fn(x, t, cond) on an eps-MSE against x0 (targets are irrelevant)."""
    with autocast(x0.device, dtype):
        loss = (fn(x0, t, cond).float() - x0).square().mean()
    loss.backward()
    for p in params:
        p.grad = None
    return loss


def cpu_compare(size, B, R, reps, warmup, archs, dtypes):
    """Ours vs diffusers, same shapes, interleaved (ours/theirs alternate who goes first) so load drift cancels."""
    device, n = torch.device("cpu"), R // VAE_DOWN
    cfg = models.SIZES[size]
    rows = []
    for arch in archs:
        torch.manual_seed(0)
        ours = build_ours(arch, size, R, control=False).train()
        theirs, call = build_diffusers(arch, cfg["hidden"], cfg["depth"], cfg["heads"], n)
        theirs.train()
        x0, cond = make_batch(arch, B, R, device, control=False)
        t = torch.randint(0, diffusion.T, (B,), generator=torch.Generator().manual_seed(1))
        fns = [(ours, ours), (call, theirs)]
        flops = [count_flops(lambda: (f(x0[:2], t[:2], {k: v[:2] for k, v in cond.items()}).float() - x0[:2])
                             .square().mean())[1] / 2 for f, _ in fns]
        for m in (ours, theirs):
            m.zero_grad(set_to_none=True)
        for dtype in dtypes:
            times = [[], []]  # per model: (wall, cpu) per rep
            for i in range(warmup + reps):
                for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                    f, m = fns[j]
                    times[j].append(timed(lambda: fwd_bwd(f, x0, t, cond, dtype, list(m.parameters())), device))
                print(f"  {arch} {DTYPE_NAMES[dtype]} rep {i}: ours {times[0][-1][0]:.2f}s diffusers "
                      f"{times[1][-1][0]:.2f}s (wall)", flush=True)
            ours_t, theirs_t = times[0][warmup:], times[1][warmup:]
            med = lambda ts, k: statistics.median([x[k] for x in ts])
            ratio = lambda k: statistics.median([a[k] / b[k] for a, b in zip(ours_t, theirs_t)])  # paired
            rows.append(dict(arch=arch, size=size, batch=B, resolution=R, dtype=DTYPE_NAMES[dtype],
                             ours_s=med(ours_t, 0), diffusers_s=med(theirs_t, 0), ratio=ratio(0), cpu_ratio=ratio(1),
                             ours_params_M=sum(p.numel() for p in ours.parameters()) / 1e6,
                             diffusers_params_M=sum(p.numel() for p in theirs.parameters()) / 1e6,
                             ours_train_gflops_per_img=flops[0] / 1e9, diffusers_train_gflops_per_img=flops[1] / 1e9))
    return rows


# ----------------------------------------------------------------------------- flops suite
def tab_a1_count(column, cond, R, size="XL", device="meta"):
    """(params M, forward GFLOPs) of one image through the model of a Tab. A1 cell (models.tab_a1_model) at R px,
    batch 1, inference, with its control / time-id inputs. On the meta device nothing is computed or allocated."""
    device = torch.device(device)
    with torch.device(device):
        model = run.tab_a1_model(column, cond, R, size).eval()
    x0, batch = make_batch(run.TAB_A1[(column, cond)]["arch"], 1, R, device, control=True, text=cond == "text",
                           classes=run.TAB_A1_CLASSES)
    with FlopCounterMode(display=False, custom_mapping=FLOP_MAP) as fc, torch.no_grad():
        model(x0, torch.zeros(1, dtype=torch.long, device=device), batch)
    return sum(p.numel() for p in model.parameters()) / 1e6, fc.get_total_flops() / 1e9


def flops_table(size="XL"):
    """One row per column and conditioning of paper Tab. A1: params and forward GFLOPs at 256 and 512 px beside
    the paper's (at size XL; other sizes build the same configurations smaller, without paper numbers)."""
    rows = []
    for (column, cond), paper in TAB_A1_PAPER.items():
        (params, g256), (_, g512) = (tab_a1_count(column, cond, R, size) for R in (256, 512))
        row = dict(column=column, cond=cond, arch=run.TAB_A1[(column, cond)]["arch"], size=size,
                   params_M=params, gflops_256=g256, gflops_512=g512)
        for key, want in zip(("params_M", "gflops_256", "gflops_512"), paper if size == "XL" else (None,) * 3):
            row[f"paper_{key}"] = want
            row[f"dev_{key}"] = None if want is None else row[key] / want - 1  # relative deviation from the paper
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- gpu suite
def fit_batch(arch, size, R, dtype, device, frac=0.85, cap=1024):
    """Largest batch (multiple of 8) whose eager train step should fit in frac of the card: peak memory is
    measured at 4 and 8 images and extrapolated linearly (fixed part = weights + grads + AdamW state)."""
    model = build_ours(arch, size, R, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    sched = diffusion.Schedule().to(device)
    x0, cond = make_batch(arch, 8, R, device)
    peaks = {}
    for b in (4, 4, 8):  # the first step allocates the optimiser state
        torch.cuda.reset_peak_memory_stats(device)
        with autocast(device, dtype):
            loss = diffusion.loss_fn(model, sched, x0[:b], {k: v[:b] for k, v in cond.items()})[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks[b] = torch.cuda.max_memory_allocated(device)
    del model, opt
    torch.cuda.empty_cache()
    per_img = (peaks[8] - peaks[4]) / 4
    free = frac * torch.cuda.get_device_properties(device).total_memory - (peaks[4] - 4 * per_img)
    return int(max(8, min(cap, free / per_img)) // 8 * 8)


def gpu_suite(args, device):
    """DiT-XL/2 and mmDiT-XL/2 at 256 px, bf16, eager then compiled, at the largest batch that fits (fit_batch on
    CUDA, else --batch); starts no new configuration once args.budget_s is spent; an OOM shrinks the batch by 1/4."""
    t_start, rows, size, R = time.time(), [], args.size or "XL", args.resolution
    for arch in ("dit", "mmdit"):
        B = args.batch or fit_batch(arch, size, R, torch.bfloat16, device)
        print(f"[{time.time() - t_start:4.0f}s] {arch}-{size}/2 at {R} px: batch {B}", flush=True)
        for compile in (False, True):
            if time.time() - t_start > args.budget_s:
                print(f"  skip {arch} compile={compile}: time budget {args.budget_s}s spent", flush=True)
                continue
            print(f"[{time.time() - t_start:4.0f}s] {arch} compile={compile} ...", flush=True)
            row = None
            while row is None and B >= 8:
                try:  # compiled rows skip the sampling step: it would recompile for no_grad / 3B shapes
                    row = bench_config(arch, size, R, B, torch.bfloat16, device, compile, args.steps, args.warmup,
                                       sample=not compile)
                except torch.OutOfMemoryError:
                    B = B * 3 // 4 // 8 * 8
                    print(f"  OOM: retry with batch {B}", flush=True)
                except Exception as e:  # a compiler failure must not cost the other rows
                    print(f"  {arch} compile={compile} failed: {e!r}"[:500], flush=True)
                    break
                finally:  # outside the except block, so the traceback's tensors are already gone
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if row is not None:
                rows.append(row)
                print_table([row], TRAIN_COLS)
    print(f"gpu suite done in {time.time() - t_start:.0f}s", flush=True)
    return rows


# ----------------------------------------------------------------------------- scale suite
# The real conditioning parts at their real sizes with seeded random weights (nothing is downloaded): the SD VAE's
# architecture (latents.SD_VAE_CONFIG, `--vae sd-random`) and open_clip's ViT-L-14 text tower (`--text-encoder-path
# random`). The B step runs train.py itself as a command line (a script never imports another script).
SCALE_VAE, SCALE_TEXT = "sd-random", ("ViT-L-14", conditioning.RANDOM_TEXT)
SCALE_R = 256  # pixels: the paper's pre-training resolution (§4) -> 32 x 32 x 4 SD latents
# (w, h) of the toy ImageNet-style JPEGs: landscape, portrait, square, 4:3, all cropped and resized to 256
SCALE_SIZES = ((300, 200), (180, 420), (512, 512), (640, 480))
SCALE_CLASSES = ("n01440764", "n01443537")  # ImageNet synset folder names (tench, goldfish)
SCALE_CAPTIONS = ("a red fox standing in fresh snow", "two wooden boats on a calm lake at dusk")
SCALE_COLS = ["part", "arch", "cond", "params_M", "gflops", "paper_gflops", "wall_s"]
STEP_COLS = ["path", "ranks", "loss", "wall_s", "params_M", "max_diff_vs_1"]


def toy_jpeg(w, h, seed):
    """JPEG bytes of a smooth random w x h image (gradients + blobs, so the JPEG is small and decodes like a photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = sum(np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy + rng.uniform()))[..., None]
              * rng.uniform(-1, 1, 3) for _ in range(3))  # (h, w, 3)
    buf = io.BytesIO()
    Image.fromarray(((img / 3 + 1) * 127.5).clip(0, 255).astype("uint8")).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_imagefolder(root):
    """root/<synset>/<name>.JPEG, the ImageNet train layout, one image of every SCALE_SIZES, classes alternating."""
    for i, (w, h) in enumerate(SCALE_SIZES):
        folder = os.path.join(root, SCALE_CLASSES[i % len(SCALE_CLASSES)])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{os.path.basename(folder)}_{i}.JPEG"), "wb") as f:
            f.write(toy_jpeg(w, h, i))
    return root


def write_wds_shards(root):
    """img2dataset output: root/NNNNN.tar holding key.jpg + key.txt + key.json (original_width / original_height of
    the image before img2dataset resized it: here twice the stored size). One sample per shard, so one process
    and 2 ranks read the same samples (ranks split the stream by shard)."""
    os.makedirs(root, exist_ok=True)
    for i, ((w, h), caption) in enumerate(zip(SCALE_SIZES, SCALE_CAPTIONS)):
        key = f"{i:05d}{0:04d}"  # img2dataset: shard id + index in the shard
        meta = dict(key=key, status="success", caption=caption, width=w, height=h, original_width=2 * w,
                    original_height=2 * h)
        members = {f"{key}.jpg": toy_jpeg(w, h, 10 + i), f"{key}.txt": caption.encode(),
                   f"{key}.json": json.dumps(meta).encode()}
        with tarfile.open(os.path.join(root, f"{i:05d}.tar"), "w") as tar:
            for name, b in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(b)
                tar.addfile(info, io.BytesIO(b))
    return root


def scale_argv(path, data_path, out_dir, ranks=1):
    """train.py's argv for one `--recipe ours --size B` step at 256 px over the real-size parts; path: "image"
    (ImageNet-style folder, class-conditional) or "text" (img2dataset shards, CLIP-L, the recipe's noisy padding).
    Global batch 2 either way: one process takes it as 2 micro-steps of 1, so that 2 ranks x 1 see the same chunks
    (train.chunk_generator: the noise of a chunk depends on its place in the global batch, not on the rank)."""
    argv = ["--recipe", "ours", "--size", "B", "--resolution", str(SCALE_R), "--vae", SCALE_VAE,
            "--global-batch", "2", "--grad-accum", str(2 // ranks), "--max-steps", "1", "--warmup", "0",
            "--log-every", "1", "--sample-every", "0", "--ckpt-every", "1", "--no-progress", "--device", "cpu",
            "--num-workers", "0",  # the step is measured, not the loader: no worker processes on a 2-core CPU
            "--out-dir", out_dir]  # warm-up 0: the step moves the weights by ~lr, far above fp32 rounding
    if path == "image":
        return argv + ["--data", "imagefolder", "--data-path", data_path]
    return argv + ["--data", "wds", "--data-path", data_path, "--semantic", "text",
                   "--text-encoder", SCALE_TEXT[0], "--text-encoder-path", SCALE_TEXT[1]]


def run_train(argv, ranks=1, threads=2, timeout=1200):
    """`python train.py argv` (ranks > 1: torchrun --standalone, gloo on the CPU); the threads are shared out over
    the ranks. Returns wall seconds; a failed run raises with the tail of its output."""
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={ranks}"]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(max(1, threads // ranks)))
    t0 = time.perf_counter()
    r = subprocess.run(launch + [os.path.join(here, "train.py"), *argv], cwd=here, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"train.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def weights_diff(ckpt_a, ckpt_b, part="model"):
    """Largest |a - b| over the weights of two checkpoints (the model, or the EMA)."""
    a, b = (torch.load(c, map_location="cpu", weights_only=False, mmap=True)[part] for c in (ckpt_a, ckpt_b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def scale_steps(root, paths=("image", "text"), threads=2):
    """One B training step per path through train.py, as one process and as 2 gloo ranks; rows with the logged
    loss, wall time (process start to checkpoint) and the largest weight difference of 2 ranks vs one process."""
    data_paths = {"image": write_imagefolder(os.path.join(root, "imagefolder")),
                  "text": write_wds_shards(os.path.join(root, "shards"))}
    rows = []
    for path in paths:
        ckpts = {}
        for ranks in (1, 2):
            out = os.path.join(root, f"{path}_{ranks}")
            wall = run_train(scale_argv(path, data_paths[path], out, ranks), ranks, threads)
            ckpts[ranks] = os.path.join(out, "ckpt.pt")
            with open(os.path.join(out, "log.jsonl")) as f:
                loss = json.loads(f.readlines()[-1])["loss"]
            ck = torch.load(ckpts[ranks], map_location="cpu", weights_only=False, mmap=True)  # ~4 GB: mapped
            rows.append(dict(path=path, ranks=ranks, loss=loss, wall_s=wall, ckpt=ckpts[ranks],
                             params_M=sum(v.numel() for v in ck["model"].values()) / 1e6,
                             max_diff_vs_1=None if ranks == 1 else weights_diff(ckpts[1], ckpts[2])))
            del ck
            print_table(rows[-1:], STEP_COLS)
    return rows


def xl_forward(arch, size, text, vae, encoder, x_img):
    """One batch-1 forward of arch at size on the SD latent of x_img: (params M, forward GFLOPs counted by
    FlopCounterMode, wall s of the counted forward). Text: CLIP-L features of a tokenized caption, replicate-padded
    (noisy padding is the same at inference, §2.1); class: a label. Control φ of an uncropped 256 px original."""
    torch.manual_seed(0)
    model = build_ours(arch, size, SCALE_R, control=True, text=text).eval()
    with torch.no_grad():
        x0 = latents.encode(vae, x_img)  # (1, 4, 32, 32)
        cond = (conditioning.encode_text(encoder, SCALE_CAPTIONS[:1], "replicate") if text
                else {"y": torch.zeros(1, dtype=torch.long)})
        cond.update(phi=run.default_phi({"data": {"resolution": SCALE_R}}, 1), keep_ctrl=torch.ones(1))
        t0 = time.perf_counter()
        with FlopCounterMode(display=False, custom_mapping=FLOP_MAP) as fc:
            eps = model(x0, torch.full((1,), 500, dtype=torch.long), cond)
        wall = time.perf_counter() - t0
    assert eps.shape == x0.shape and torch.isfinite(eps).all(), f"{arch}-{size}: bad forward output"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    del model
    gc.collect()
    return params, fc.get_total_flops() / 1e9, wall


def scale_forwards(archs, size="XL"):
    """The real-size parts (SD VAE, CLIP ViT-L/14 text tower) and every arch at size, one at a time, batch 1 at
    256 px: rows of params, forward GFLOPs beside paper Tab. A1 (class-conditional; the text row is ambiguous) and
    wall time. Text archs run both class- and text-conditional."""
    rows, x_img = [], torch.rand(1, 3, SCALE_R, SCALE_R, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = latents.load_vae(SCALE_VAE)
    with FlopCounterMode(display=False, custom_mapping=FLOP_MAP) as fc:
        wall = timed(lambda: latents.encode(vae, x_img), torch.device("cpu"))[0]
    rows.append(dict(part="SD VAE encode", arch="AutoencoderKL", cond="-", wall_s=wall, gflops=fc.get_total_flops() / 1e9,
                     params_M=sum(p.numel() for p in vae.parameters()) / 1e6))
    encoder = conditioning.TextEncoder(*SCALE_TEXT)
    with FlopCounterMode(display=False, custom_mapping=FLOP_MAP) as fc:
        wall = timed(lambda: encoder(SCALE_CAPTIONS[:1]), torch.device("cpu"))[0]
    rows.append(dict(part="CLIP-L text", arch=SCALE_TEXT[0], cond="77 tokens", wall_s=wall,
                     gflops=fc.get_total_flops() / 1e9, params_M=sum(p.numel() for p in encoder.parameters()) / 1e6))
    print_table(rows, SCALE_COLS)
    for arch in archs:
        for text in (False, True) if arch in TEXT_ARCHS else (False,):
            params, gflops, wall = xl_forward(arch, size, text, vae, encoder, x_img)
            rows.append(dict(part="denoiser", arch=f"{arch}-{size}", cond="text" if text else "class",
                             params_M=params, gflops=gflops, paper_gflops=None if text else paper_gflops_256(arch), wall_s=wall))
            print_table(rows[-1:], SCALE_COLS)
    return rows


def scale_suite(args):
    """--suite scale: the B steps (cheap part) then the forwards at --size (XL unless given); tables as they finish."""
    rows = []
    if "step" in args.scale_parts:
        with tempfile.TemporaryDirectory(dir=args.scale_dir) as root:
            steps = scale_steps(root, args.scale_paths, args.threads or torch.get_num_threads())
        print_table(steps, STEP_COLS)
        rows += [{k: v for k, v in r.items() if k != "ckpt"} for r in steps]  # the checkpoints are gone
    if "forward" in args.scale_parts:
        fwd = scale_forwards(args.scale_archs, args.size or "XL")
        print_table(fwd, SCALE_COLS)
        rows += fwd
    return rows


# ----------------------------------------------------------------------------- memory plan
# The paper's run on one node of 8 cards, by run.py's plan (fixed memory + micro-batch x activations per image;
# run.memory_per_card / run.plan_micro_batch, which train.py --grad-accum auto uses at start). The cards' memory
# as CUDA reports it (GiB).
CARDS = {"A100-40GB": 40.0, "A100-80GB": 80.0, "H100-80GB": 79.6, "H200": 140.4}
PLAN_GPUS = 8
PLAN_RUNS = {  # name -> train.py flags of the paper's run (the recipe's own defaults otherwise)
    "ImageNet-1k 256 (class)": ["--num-classes", "1000"],
    "ImageNet-1k 512 (class)": ["--num-classes", "1000", "--resolution", "512"],
    "CC12M 256 (text)": ["--semantic", "text"],
}
def print_config(flags):
    """{"spec", "args"} of `python train.py flags --print-config`: the run exactly as train.py resolves it."""
    out = subprocess.run([sys.executable, "train.py", *flags, "--print-config"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory(run_flags):
    """The run's model (train.py --print-config) -> dict(params, fixed_gib, act_gib per image, global_batch,
    bf16_gib). Deterministic (shapes only), so it is computed once per process and flags."""
    return dict(_measure_memory(tuple(run_flags)))


@functools.lru_cache(maxsize=None)
def _measure_memory(run_flags):
    cfg = print_config(["--size", "XL", *run_flags])
    spec, args = cfg["spec"], cfg["args"]
    text = args["semantic"] == "text"
    if text:  # the tower's widths are read from the loaded encoder at run time; CLIP ViT-L/14: 768 and 768
        spec["model"].update(text_dim=TEXT_DIM, pooled_dim=POOLED_DIM)
    frozen = run.SD_VAE_PARAMS + (run.CLIP_L_TEXT_PARAMS if text else 0)  # fp32 frozen encoders, on the card
    return dict(run.memory_per_card(spec, frozen), global_batch=args["global_batch"])


def bench_peak_gib(m, batch):
    """The plan's prediction for bench.py's own training step (no EMA, no DDP buckets, no frozen encoders: weights,
    grads and AdamW's moments, 16 bytes per parameter, + autocast's bf16 copies + batch x activations), to hold
    against the peak the GPU suite measured."""
    return 16 * m["params"] / 2**30 + m["bf16_gib"] + batch * m["act_gib"]


def plan_card(m, card_gib, gpus=PLAN_GPUS):
    """run.plan_micro_batch for one of `gpus` cards sharing the run's global batch."""
    return run.plan_micro_batch(m, m["global_batch"] // gpus, card_gib)


PLAN_COLS = ["run", "card", "params_M", "fixed_GiB", "act_GiB_per_img", "per_card_batch", "micro_batch",
             "grad_accum", "planned_GiB"]


def memory_plan(runs=PLAN_RUNS, cards=CARDS, gpus=PLAN_GPUS, recipe="ours"):
    """Rows of the plan: every PLAN_RUNS run of `recipe` on `gpus` of every CARDS card (None where one image does
    not fit); text runs only for an arch with a text mode (Tab. 1: DiT and mDT are class-only)."""
    rows = []
    text_ok = models.MODELS[run.RECIPES[recipe]["arch"]].supports_text
    for name, flags in runs.items():
        if "text" in flags and not text_ok:
            continue
        m = measure_memory(["--recipe", recipe, *flags])
        for card, gib in cards.items():
            p = plan_card(m, gib, gpus)
            rows.append(dict(run=name, card=f"{gpus} x {card}", params_M=m["params"] / 1e6, fixed_GiB=m["fixed_gib"],
                             act_GiB_per_img=m["act_gib"], per_card_batch=m["global_batch"] // gpus,
                             micro_batch=p and p[0], grad_accum=p and p[1], planned_GiB=p and p[2]))
    return rows


# ----------------------------------------------------------------------------- gpu-train suite
def card_of(total_gib):
    """The CARDS entry nearest a device's memory (GiB)."""
    return min(CARDS, key=lambda c: abs(CARDS[c] - total_gib))


def gpu_train_argv(data_path, out_dir, per_card, accum, steps, cuda=True, save_ckpt=False):
    """train.py's flags for the GPU run: the paper's recipe at XL on the given latents, this card's share of the
    8-card batch as --global-batch per_card in `accum` micro-steps; compiled on CUDA (as the paper's run would be);
    no checkpoint (an XL ckpt.pt is ~21 GB) unless save_ckpt, then one at the end."""
    return ["--recipe", "ours", "--size", "XL", "--data", "latents", "--data-path", data_path,
            "--global-batch", str(per_card), "--grad-accum", str(accum), "--max-steps", str(steps),
            "--log-every", str(max(1, steps // 10)), "--sample-every", "0", "--ckpt-every",
            str(steps if save_ckpt else 0), "--no-progress", "--out-dir", out_dir] + (
                ["--compile"] if cuda else ["--device", "cpu"])


def gpu_train_report(log_path, card, planned, global_batch):
    """One row from a run's log.jsonl: img/s and MFU of the last log window, peak memory (GiB) against the plan,
    the first and last loss, whether every logged loss was finite, and the hours per 100k steps that img/s gives
    on PLAN_GPUS cards of this kind at the recipe's global batch (ideal scaling: no communication cost)."""
    with open(log_path) as f:
        recs = [json.loads(line) for line in f]
    last = recs[-1]
    return dict(card=card, steps=last["step"], img_per_s=last["img_per_s"], mfu=last["mfu"], peak_GiB=last["mem_gb"],
                planned_GiB=planned, loss_first=recs[0]["loss"], loss_last=last["loss"],
                finite=all(math.isfinite(r["loss"]) for r in recs),
                hours_per_100k=100_000 * global_batch / (PLAN_GPUS * last["img_per_s"]) / 3600)


def gpu_train(args, device):
    """--suite gpu-train: `--recipe ours --size XL` for args.train_steps steps on one GPU at the memory plan's
    per-card batch (the 8-card run's 256 images, as micro-batch x --grad-accum for this card), on synthetic latents
    (latents.synthetic_latents: no dataset, no VAE weights), through train.py itself under torchrun. Off CUDA it only
    prints the plan and the command (as --dry-run does), for the H200."""
    cuda = device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else CARDS["H200"]
    name = "ImageNet-1k 256 (class)"
    m = measure_memory(PLAN_RUNS[name])
    micro, accum, planned = plan_card(m, total)
    per_card = m["global_batch"] // PLAN_GPUS
    dry = args.dry_run or not cuda
    root = args.out_dir or ("TMP" if dry else tempfile.mkdtemp(prefix="gpu_train_"))
    argv = gpu_train_argv(os.path.join(root, "latents"), os.path.join(root, "run"), per_card, accum,
                          args.train_steps, save_ckpt=args.save_ckpt)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py", *argv]
    print(f"{card_of(total)} ({total:.1f} GiB): {name}, per-card batch {per_card} = micro {micro} x grad-accum "
          f"{accum}, planned {planned:.1f} GiB\n  torchrun --standalone --nproc_per_node 1 train.py {' '.join(argv)}",
          flush=True)
    if dry:
        return []
    latents.synthetic_latents(os.path.join(root, "latents"), n=8 * per_card, num_classes=NUM_CLASSES)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    row = gpu_train_report(os.path.join(root, "run", "log.jsonl"), card_of(total), planned, m["global_batch"])
    row.update(per_card_batch=per_card, micro_batch=micro, grad_accum=accum, wall_s=time.time() - t0)
    if not args.out_dir:
        shutil.rmtree(root, ignore_errors=True)  # the XL checkpoint: 21 GB
    return [row]


# ----------------------------------------------------------------------------- report
TRAIN_COLS = ["arch", "size", "resolution", "batch", "dtype", "compile", "params_M", "fwd_gflops_per_img",
              "train_gflops_per_img", "step_ms", "img_per_s", "peak_mem_mb", "mfu", "sample_step_ms"]
FLOPS_COLS = ["column", "cond", "arch", "params_M", "paper_params_M", "gflops_256", "paper_gflops_256", "gflops_512",
              "paper_gflops_512"]
COMPARE_COLS = ["arch", "size", "batch", "dtype", "ours_s", "diffusers_s", "ratio", "cpu_ratio", "ours_params_M",
                "diffusers_params_M", "ours_train_gflops_per_img", "diffusers_train_gflops_per_img"]


def print_table(rows, cols):
    """Markdown table, so the output can be pasted into the README."""
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |", flush=True)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to run
    p.add_argument("--suite", default=None,
                   choices=["cpu-compare", "cpu-default", "gpu", "flops", "scale", "memory", "gpu-train"],
                   help="preset suite; default: one configuration given by the model flags")
    # model
    p.add_argument("--arch", choices=list(models.MODELS), default="dit", help="denoiser (models.MODELS)")
    p.add_argument("--size", choices=list(models.SIZES), default=None,
                   help="size preset (models.SIZES); default S (gpu and flops suites: XL)")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels; the latent is resolution/8")
    p.add_argument("--batch", type=int, default=None, help="images per step; default 8 (gpu suite: fill the card)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="build with crop/size/flip control conditioning (the paper's recipe)")
    # system
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="autocast dtype; default bf16 on cuda, fp32 on cpu (gpu suite: always bf16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default torch's")
    # measurement
    p.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--sample", action=argparse.BooleanOptionalAction, default=True,
                   help="also time one guided sampling step (3 branches batched)")
    p.add_argument("--reps", type=int, default=5, help="cpu-compare: timed fwd+bwd pairs per model and dtype")
    p.add_argument("--compare-archs", nargs="+", choices=["dit", "pixart", "mmdit"], default=["dit", "pixart", "mmdit"],
                   help="cpu-compare: archs that have a diffusers counterpart")
    p.add_argument("--compare-dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"],
                   help="cpu-compare: fp32 and/or bf16 autocast")
    p.add_argument("--budget-s", type=float, default=180, help="gpu suite: start no new configuration after this")
    p.add_argument("--scale-parts", nargs="+", choices=["step", "forward"], default=["step", "forward"],
                   help="scale suite: the B training steps (image and text path, 1 process vs 2 gloo ranks) and/or "
                        "one batch-1 forward per arch at --size (default XL) through the real-size VAE and CLIP-L")
    p.add_argument("--scale-paths", nargs="+", choices=["image", "text"], default=["image", "text"],
                   help="scale suite: which B steps (ImageNet-style JPEG folder / img2dataset shards)")
    p.add_argument("--scale-archs", nargs="+", choices=list(models.MODELS), default=list(models.MODELS),
                   help="scale suite: archs of the forward part (default: all)")
    p.add_argument("--scale-dir", default=None, help="scale suite: folder for the toy data and the ~2 GB checkpoints "
                   "of each B step (default: a temporary folder, deleted afterwards)")
    p.add_argument("--recipe", choices=list(run.RECIPES), default="ours", help="memory suite: the train.py --recipe "
                   "(a Tab. 1 row) whose full-scale run is planned")
    p.add_argument("--gpus", type=int, default=PLAN_GPUS, help="memory suite: cards the global batch is split over "
                   "(default 8, one node; the paper's runs use 16, two nodes of 8)")
    p.add_argument("--train-steps", type=int, default=120, help="gpu-train suite: training steps (120: compile + "
                   "steps + start-up within 5 minutes on one H100 or H200)")
    p.add_argument("--save-ckpt", action="store_true", help="gpu-train suite: also write the ~21 GB XL checkpoint "
                   "at the end (default: none, so the run measures training alone)")
    p.add_argument("--dry-run", action="store_true", help="gpu-train suite: print the plan and the command, run nothing")
    p.add_argument("--out-dir", default=None, help="gpu-train suite: folder for the synthetic latents and the run "
                   "(default: a temporary folder; deleted afterwards)")
    # io
    p.add_argument("--out", default="bench.json", help="JSON file with the config, the device and every row")
    return p


def run_suite(args, device, dtype):
    """The rows of --suite (or of the one configuration the model flags give), printed as a table."""
    if args.suite == "cpu-compare":
        rows = cpu_compare(args.size or "S", args.batch or 8, args.resolution, args.reps, args.warmup,
                           args.compare_archs, [DTYPES[d] for d in args.compare_dtypes])
        print_table(rows, COMPARE_COLS)
    elif args.suite == "cpu-default":
        rows = cpu_default(max(args.steps, 30), max(args.warmup, 5))
        print_table(rows, ["arch", "size", "resolution", "batch", "step_ms", "steps_per_s", "budget_min"])
        print(f"the CPU budget ({BUDGET_MIN:g} min at {REF_STEPS_PER_S} steps/s of this job) is "
              f"{rows[0]['budget_min']:.2f} min on this machine")
    elif args.suite == "flops":
        rows = flops_table(args.size or "XL")
        print_table(rows, FLOPS_COLS)
    elif args.suite == "scale":
        rows = scale_suite(args)
    elif args.suite == "memory":
        rows = memory_plan(gpus=args.gpus, recipe=args.recipe)
        print_table(rows, PLAN_COLS)
    elif args.suite == "gpu-train":
        rows = gpu_train(args, device)
        if rows:
            print_table(rows, list(rows[0]))
    elif args.suite == "gpu":
        assert device.type == "cuda" or args.batch, "--suite gpu off CUDA (a dry run) needs --batch"
        rows = gpu_suite(args, device)
        print_table(rows, TRAIN_COLS)
    else:
        rows = [bench_config(args.arch, args.size or "S", args.resolution, args.batch or 8, dtype, device, args.compile,
                             args.steps, args.warmup, args.control, args.sample)]
        print_table(rows, TRAIN_COLS)
    return rows


def main():
    args = get_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    print(f"device {device_peak(device)[0]}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = run_suite(args, device, dtype)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "device": device_peak(device)[0], "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
