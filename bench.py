"""
Benchmark: training step time, images/s, peak memory, FLOPs per image, MFU and guided sampling step time.

A training step is forward + backward + AdamW step through diffusion.loss_fn, as train.py runs it. FLOPs are
counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; elementwise ops are free),
never by hand formulas. MFU = counted training FLOPs per image * images/s / the card's dense bf16 peak.
The sampling step is one denoiser call with the three guidance branches of Eq. 2 batched (diffusion.guided_eps_fn).

    python bench.py --arch dit --size S --resolution 256 --batch 8 --device cpu     # one configuration
    python bench.py --suite cpu-compare --threads 1 --warmup 1 --reps 7   # DiT / PixArt / mmDiT S/2 vs diffusers
    python bench.py --suite gpu              # DiT-XL/2 and mmDiT-XL/2 at 256 px, bf16, eager and compiled
    python bench.py --suite flops            # params and forward GFLOPs of every arch at XL/2 (paper Tab. A1)
    python bench.py --suite cpu-default --threads 2   # the reference CPU step: this machine's share of the CPU budget
"""
import argparse
import gc
import json
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import conditioning
import diffusion
import models
from conditioning import CONTROL_SIGNALS
from data import LATENT_CH, VAE_DOWN  # SD VAE: 4 latent channels, 8x down
from models import FLOP_MAP, autocast, count_flops, device_peak  # FLOP counting, shared with train.py's MFU

# ----------------------------------------------------------------------------- constants
NUM_CLASSES = 1000  # ImageNet-1k, for class-conditional archs
TEXT_DIM = POOLED_DIM = 768  # open_clip ViT-L-14 token width and pooled width
TEXT_ARCHS = ("pixart", "mmdit", "unet")  # archs benchmarked text-conditional (the paper's CC12M models)
LAM, BETA = 1.5, 1.375  # guidance of the sampling benchmark (paper: lam 1.5 at 256, beta 1.375 best)
# Paper Tab. A1, FLOPs@256 (G) of the XL/2 models, batch 1 (the table counts 2 FLOPs per multiply-add, as we do:
# DiT-XL/2 237.4 = 2 x DiT's 118.6 "Gflops"). The columns of the text-conditional row are ambiguous, so only the
# class-conditional (ImageNet) values are copied, in the table's column order.
PAPER_A1 = {("unet", False): 95.38, ("pixart", False): 275.14, ("mmdit", False): 237.93, ("mdt", False): 259.08,
            ("dit", False): 237.4}
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
        cond["phi"] = conditioning.default_phi({"data": {"resolution": R}}, B, flip=True)
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
    if arch == "mmdit":  # SD3 with RMSNorm on q/k (SD3.5 style), as SPEC §4 asks of ours
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
def flops_table(size):
    """Params and forward GFLOPs of one image (inference, no control) for every arch at 256 and 512 px, class- and,
    where the arch takes text, text-conditional: the counterpart of paper Tab. A1. Runs on meta tensors (no compute)."""
    meta, rows = torch.device("meta"), []
    for arch in models.MODELS:
        for text in (False, True) if arch in TEXT_ARCHS else (False,):
            row = dict(arch=arch, size=size, cond="text" if text else "class",
                       paper_gflops_256=PAPER_A1.get((arch, text)))
            for R in (256, 512):
                model = build_ours(arch, size, R, control=False, device=meta, text=text).eval()
                x0, cond = make_batch(arch, 1, R, meta, control=False, text=text)
                with FlopCounterMode(display=False, custom_mapping=FLOP_MAP) as fc, torch.no_grad():
                    model(x0, torch.zeros(1, dtype=torch.long, device=meta), cond)
                row[f"gflops_{R}"] = fc.get_total_flops() / 1e9
            row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
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


# ----------------------------------------------------------------------------- report
TRAIN_COLS = ["arch", "size", "resolution", "batch", "dtype", "compile", "params_M", "fwd_gflops_per_img",
              "train_gflops_per_img", "step_ms", "img_per_s", "peak_mem_mb", "mfu", "sample_step_ms"]
FLOPS_COLS = ["arch", "size", "cond", "params_M", "gflops_256", "paper_gflops_256", "gflops_512"]
COMPARE_COLS = ["arch", "size", "batch", "dtype", "ours_s", "diffusers_s", "ratio", "cpu_ratio", "ours_params_M",
                "diffusers_params_M", "ours_train_gflops_per_img", "diffusers_train_gflops_per_img"]


def print_table(rows, cols):
    """Markdown table, so the output can be pasted into the README."""
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to run
    p.add_argument("--suite", choices=["cpu-compare", "cpu-default", "gpu", "flops"], default=None,
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
    # io
    p.add_argument("--out", default="bench.json", help="JSON file with the config, the device and every row")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    print(f"device {device_peak(device)[0]}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
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
    elif args.suite == "gpu":
        assert device.type == "cuda" or args.batch, "--suite gpu off CUDA (a dry run) needs --batch"
        rows = gpu_suite(args, device)
        print_table(rows, TRAIN_COLS)
    else:
        rows = [bench_config(args.arch, args.size or "S", args.resolution, args.batch or 8, dtype, device, args.compile,
                             args.steps, args.warmup, args.control, args.sample)]
        print_table(rows, TRAIN_COLS)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "device": device_peak(device)[0], "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
