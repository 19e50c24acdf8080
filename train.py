r"""
Train a diffusion denoiser: one process or torchrun DDP, bf16 on GPU, EMA, exact resume.

    python train.py                                   # tiny "ours" mmDiT, embedded data, 16 px pixels, CPU, minutes
    torchrun --nproc_per_node=8 train.py --recipe ours --size XL --data imagefolder --data-path /imagenet/train \
        --out-dir runs/in1k256                    # the paper's run: 256 px SD-VAE latents, batch 2048, lr 1e-3
    python train.py --size XL --resolution 512 --print-config    # what a run resolves to, and who set each value

Rerunning the same command resumes from <out-dir>/ckpt.pt. Every setting comes from the first of: the flag given
> the --recipe row (Tab. A4) > the --size scale (S/B/L/XL: the paper's run, §4) > the default below (the tiny CPU
job); run.resolve_settings holds that one precedence and its tables.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import types
import typing

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import conditioning
import data
import latents
import diffusion
import models
import run as runlib

LOSS_BINS = 4  # loss logged in 4 bins of t (minRF-style diagnostic)
_UNSET = object()  # marks a flag not given on the command line


def default_text(dest, default):
    """'(default: ...)' of a flag, written from the layer tables themselves (run.py) so that help cannot drift."""
    parts = [] if default is None else [f"{default}" if not isinstance(default, list) else " ".join(map(str, default))
                                        or "none"]
    scale = runlib.scale_layer("XL", "ours", runlib.PAPER_SCALE["resolution"])
    if dest == "global_batch":
        parts.append("S/B/L/XL: " + ", ".join(f"{b} at {r} px" for r, b in runlib.PAPER_BATCH.items()))
    elif dest in scale:
        parts.append(f"S/B/L/XL: {scale[dest]}")
    rows = {r: row[dest] for r, row in runlib.RECIPES.items() if dest in row}
    if rows:
        show = lambda v: " / ".join(f"{c} {x}" for c, x in v.items()) if isinstance(v, dict) else v  # noqa: E731
        parts.append("--recipe " + ", ".join(f"{r} {show(v)}" for r, v in rows.items()))
    if dest in runlib.TINY_RECIPE:
        parts.append(f"ours at --size tiny {runlib.TINY_RECIPE[dest]}")
    return f" (default: {'; '.join(parts)})" if parts else ""


def grad_accum_arg(v):
    """--grad-accum: 'auto' or a positive int."""
    if v == "auto":
        return v
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"{v!r}: give a positive integer or auto")
    return int(v)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(g, flag, help, default=None, **kw):  # every flag's default text comes from default_text
        dest = flag[2:].replace("-", "_")
        g.add_argument(flag, default=default, help=help + default_text(dest, default).replace("%", "%%"), **kw)

    add(p, "--recipe", "a system the paper trains (Tab. 1): ours (mmDiT++), sd3 (mmDiT, rectified flow), sdxl "
        "(UNet), dit (DiT w/ LN), dit-att (DiT w/ Att), mdt (mDT-v2), pixart (PixArt-alpha); its row (run.RECIPES) "
        "sets the defaults of the flags it names", "ours", choices=list(runlib.RECIPES))
    add(p, "--tiny-recipe", f"with --recipe ours --size tiny, apply the CPU job's deviations {runlib.TINY_RECIPE}",
        True, action=argparse.BooleanOptionalAction)
    g = p.add_argument_group("data")
    add(g, "--data", "dataset source; 'embedded' and 'embedded-web' need no files", "embedded", choices=data.SOURCES)
    add(g, "--data-path", "dataset root / shard pattern (unused for 'embedded')")
    add(g, "--resolution", "training resolution in pixels", data.RESOLUTION, type=int)
    add(g, "--crop", "crop scale: global [0.9,1], local [0.4,0.6], mix [0.4,1] of min(H,W) (§2.2); center: the "
        "centred min(H,W) square, flipped like the others unless --no-flip", "global", choices=data.CROPS)
    add(g, "--flip", "random horizontal flip, p = --flip-p", True, action=argparse.BooleanOptionalAction)
    add(g, "--flip-p", "probability of a flip under --flip (below 0.5 a caption's side stays learnable without flip "
        "in φ, and φ's flip carries the rest)", data.FLIP_P, type=float)
    add(g, "--num-workers", "DataLoader worker processes per rank", 0, type=int)
    add(g, "--vae", f"'none' = pixel space; else a diffusers AutoencoderKL name/path (e.g. {latents.DEFAULT_VAE}) "
        "whose latents the model is trained on", "none")
    add(g, "--semantic", "semantic condition", "class", choices=["class", "text"])
    add(g, "--num-classes", "class count (none: taken from the dataset)", type=int)
    g = p.add_argument_group("model")
    add(g, "--arch", "denoiser", choices=list(models.MODELS))
    add(g, "--size", "size preset (tiny: the CPU job; S/B/L/XL: DiT's widths and the paper's run)", "tiny",
        choices=list(models.SIZES))
    add(g, "--width", "transformers: hidden width instead of the preset's; heads keep the preset's head width "
        "(none: the preset's)", type=int)
    add(g, "--depth", "transformers: blocks instead of the preset's (none: the preset's)", type=int)
    add(g, "--patch-size", "transformer patch size", 2, type=int)
    add(g, "--class-in", "class via adaLN or attention", choices=["adaln", "attn"])
    add(g, "--pe-grid", "2-D sin-cos PE grid: arange(n) or linspace over the pre-training grid (§2.2)",
        "extrapolate", choices=list(models.PE_GRIDS))
    add(g, "--pe-base", "PE grid size of pre-training (none: this grid)", type=int)
    add(g, "--mask-ratio", "mDT latent mask ratio", 0.3, type=float)
    add(g, "--context-weights", "mmdit: the weights the class / text tokens own: full (SD3's second stream), qkv "
        "(their own q/k/v only), shared (the image stream's); none: full", choices=list(models.CONTEXT_WEIGHTS))
    add(g, "--time-ids", "unet: SDXL's micro-conditioning on the original size and crop (time ids)",
        action=argparse.BooleanOptionalAction)
    add(g, "--class-tokens", "context tokens made from the class embedding, told apart by learned offsets (none: "
        "the arch's own, 1 for dit/mmdit, 4 for pixart/unet)", type=int)
    g = p.add_argument_group("diffusion")
    add(g, "--schedule-scale", "noise schedule scale s'/s, Eq. 3; for rf it multiplies --shift (the same "
        "operation)", 1.0, type=float)
    add(g, "--base-resolution", "pre-training resolution in pixels of a fine-tuning run: evaluate.py's guidance "
        "default follows Eq. 4 from it (transfer.py sets it; none: this resolution)", type=int)
    add(g, "--objective", "model output: eps, v, x0 (DDPM schedule) or rf (rectified flow, v = eps - x0, Euler "
        "sampler)", choices=diffusion.OBJECTIVES)
    add(g, "--t-density", "training density of t (logit-normal over t/T for the DDPM schedule; none: logit-normal "
        "for rf, uniform otherwise)", choices=diffusion.T_DENSITIES)
    add(g, "--t-mean", "m of the logit-normal pi(t; m, s)", 0.0, type=float)
    add(g, "--t-std", "s of the logit-normal pi(t; m, s)", 1.0, type=float)
    add(g, "--shift", "rf only: SD3's t' = shift t / (1 + (shift-1) t), in training and sampling", 1.0, type=float)
    add(g, "--loss-weight", "none, or min-snr: min(SNR, gamma) in x0 space, expressed for the objective (Hang et "
        "al. 2023)", "none", choices=diffusion.LOSS_WEIGHTS)
    add(g, "--min-snr-gamma", "gamma of min-snr", diffusion.MIN_SNR_GAMMA, type=float)
    add(g, "--zero-snr", "rescale betas to zero terminal SNR (Lin et al. 2024); needs --objective v or x0", False,
        action=argparse.BooleanOptionalAction)
    add(g, "--clip-x0", "clamp predicted x0 to [-1, 1] while sampling; pixel space only", False,
        action=argparse.BooleanOptionalAction)
    g = p.add_argument_group("conditioning")
    add(g, "--control", "control signals in adaLN (Eq. 1); give none for no control", nargs="*",
        choices=conditioning.CONTROL_SIGNALS)
    add(g, "--gamma", "gamma_c(t) of Eq. 1", choices=conditioning.GAMMA_SCHEDULES)
    add(g, "--gamma-alpha", "alpha of the cosine gamma_c", type=float)
    add(g, "--gamma-step-sigma", "threshold of the 'step' gamma_c", 1.0, type=float)
    add(g, "--p-drop-sem", "semantic dropout probability, for CFG", 0.1, type=float)
    add(g, "--p-drop-ctrl", "control dropout probability, for Eq. 2", 0.1, type=float)
    add(g, "--text-encoder", "open_clip text tower, or 'tiny' (a random 2-layer tower)", "ViT-L-14")
    add(g, "--text-encoder-path", "open_clip pretrained tag or weights file", "openai")
    add(g, "--text-pad", "text padding (§2.1, Tab. 3)", choices=conditioning.TEXT_PADDINGS)
    add(g, "--beta-txt", "noise of noisy replicate padding, Eq. 7", type=float)
    g = p.add_argument_group("optim")
    add(g, "--lr", "AdamW learning rate, constant after warm-up", 2e-3, type=float)
    add(g, "--adam-betas", "AdamW betas", type=float, nargs=2)
    add(g, "--weight-decay", "AdamW weight decay", type=float)
    add(g, "--global-batch", "images per optimiser step, all ranks", 32, type=int)
    add(g, "--grad-accum", "micro-steps per optimiser step, or auto: on CUDA the largest per-card micro-batch that "
        "the memory plan (run.plan_micro_batch) fits on this card, printed at start; 1 on the CPU", "auto",
        type=grad_accum_arg)
    add(g, "--ema-decay", "EMA decay, warmed up as min(d, (1+n)/(10+n))", 0.999, type=float)
    add(g, "--grad-clip", "clip the gradient norm; 0 = off", 1.0, type=float)
    add(g, "--warmup", "linear lr warm-up steps", 100, type=int)
    add(g, "--lr-decay", "linear lr decay to 0 over the last N steps before --max-steps; 0 = constant lr, as the "
        "paper", 0, type=int)
    add(g, "--max-steps", "optimiser steps to train", 2400, type=int)
    g = p.add_argument_group("system")
    add(g, "--device", "auto | cpu | cuda (auto: cuda if available)", "auto")
    add(g, "--precision", "autocast dtype; master weights stay fp32 (auto: bf16 on CUDA, fp32 on the CPU)", "auto",
        choices=["auto", "bf16", "fp32"])
    add(g, "--compile", "torch.compile the model", False, action=argparse.BooleanOptionalAction)
    add(g, "--seed", "base seed; rank r uses seed + r", 0, type=int)
    g = p.add_argument_group("io")
    add(g, "--out-dir", "checkpoints, config.json, log.jsonl, grids", "out")
    add(g, "--resume", "resume from <out-dir>/ckpt.pt when it exists", True, action=argparse.BooleanOptionalAction)
    add(g, "--init-from", "initialise weights from a checkpoint (e.g. transfer.py output), strict=False with a "
        "report of missing/unexpected keys")
    add(g, "--ckpt-every", f"checkpoint interval in steps: <out-dir>/ckpt.pt (to resume) and <out-dir>/{runlib.EMA_FILE} "
        "(the EMA weights and the run spec, to share), and at the end; 0 = none at all (a benchmark: nothing to resume)",
        500, type=int)
    add(g, "--keep-every", "also keep <out-dir>/ckpt_<step>.pt every N steps (a multiple of --ckpt-every), for "
        "evaluating along the training curve; 0 = only the latest", 0, type=int)
    add(g, "--tensorboard", "write scalars (loss, lr, grad norm, img/s, loss per t bin, memory) and the sample grids "
        "to <out-dir>/tb/ for `tensorboard --logdir <out-dir>/tb`", False, action=argparse.BooleanOptionalAction)
    add(g, "--wandb", "also log the same to Weights & Biases (needs `pip install wandb`; project cond-diffusion)",
        False, action=argparse.BooleanOptionalAction)
    add(g, "--sample-every", "sample grid interval in steps, and one at the end; 0 = no grids", 1000, type=int)
    add(g, "--log-every", "log interval in steps", 50, type=int)
    add(g, "--sample-steps", "sampling steps of the periodic grids", 50, type=int)
    add(g, "--sample-cfg", "guidance lam of the periodic grids (DiT's sample grids use 4, FID 1.5)", 4.0, type=float)
    add(g, "--progress", "progress bar", True, action=argparse.BooleanOptionalAction)
    add(g, "--print-config", "print {\"spec\": run spec, \"args\": ..., \"set_by\": the layer that set each "
        "value} (what config.json would hold; spec entries that need the data or the VAE are null) and exit", False,
        action="store_true")
    return p


def parse(argv=None):
    """(args, set_by): the flags given, over the layers of run.resolve_settings; set_by[k] names the layer
    ("flag", "recipe", "scale" or "tiny") that set args.k."""
    p = get_parser()
    defaults = vars(p.parse_args([]))  # the parser's own defaults: the tiny CPU job
    given = vars(p.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(defaults, _UNSET))))
    flags = {k: v for k, v in given.items() if v is not _UNSET}
    from_data = {}
    if flags.get("data") == "latents" and flags.get("data_path"):  # the shards' own resolution (meta.json)
        res = data.latents_resolution(flags["data_path"])
        from_data = {"resolution": res} if res else {}
    settings, set_by = runlib.resolve_settings(defaults, flags, from_data)
    args = argparse.Namespace(**settings)
    args.t_density = args.t_density or diffusion.default_t_density(args.objective)  # stored resolved
    try:  # refuse combinations the schedule cannot sample (eps + zero-snr, shift without rf) before any work
        diffusion.schedule_from_args(vars(args))
    except ValueError as e:
        p.error(str(e))
    return args, set_by


def parse_args(argv=None):
    return parse(argv)[0]


def explicit_flags(argv=None):
    """dests of the flags given on the command line (not from a default or the recipe)."""
    return {k for k, v in parse(argv)[1].items() if v == "flag"}


# ----------------------------------------------------------------------------- data position & randomness
class StepSampler(torch.utils.data.Sampler):
    """Batch sampler over an endless stream of per-epoch permutations; knows its exact position.

    Stream position p holds (epoch, perm_epoch[p % n]) with epoch = p // n. Optimiser step s consumes positions
    [s*G, (s+1)*G), cut into world*accum chunks of `micro`; rank r, micro-step k takes chunk k*world + r. So the
    data of a step depends only on (seed, step), not on how it is split over ranks and micro-steps, and resuming
    at step s is exact. Items are (epoch, index) pairs: the dataset's augmentation is keyed by both.
    """

    def __init__(self, n, seed, step, micro, world, rank, accum):
        self.n, self.seed, self.step, self.micro = n, seed, step, micro
        self.world, self.rank, self.accum = world, rank, accum
        self._perm = (None, None)

    def position(self, step):
        pos = step * self.micro * self.world * self.accum
        return {"epoch": pos // self.n, "index": pos % self.n}

    def _item(self, pos):
        epoch = pos // self.n
        if self._perm[0] != epoch:  # one permutation per epoch, seeded by (seed, epoch)
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return epoch, self._perm[1][pos % self.n].item()

    def __iter__(self):
        step = self.step
        while True:
            for k in range(self.accum):
                start = (step * self.world * self.accum + k * self.world + self.rank) * self.micro
                yield [self._item(start + i) for i in range(self.micro)]
            step += 1


class EpochIndexed(torch.utils.data.Dataset):
    """ds[(epoch, i)] = ds.set_epoch(epoch); ds[i]: works inside DataLoader workers, where set_epoch from the
    main process would not reach the workers' copies."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        self.ds.set_epoch(item[0])
        return self.ds[item[1]]


def stream_batches(ds, micro, num_workers, pos):
    """Endless micro-batches of an iterable dataset (webdataset shards), updating pos = {"epoch", "index"} (samples
    of this rank's stream consumed). Exact resume within an epoch without workers, at epoch boundaries with them."""
    while True:
        ds.set_epoch(pos["epoch"], skip=pos["index"])
        for b in torch.utils.data.DataLoader(ds, batch_size=micro, num_workers=num_workers, collate_fn=data.collate):
            pos["index"] += micro
            yield b
        pos["epoch"], pos["index"] = pos["epoch"] + 1, 0


def chunk_generator(seed, step, chunk, device, stream=0):
    """RNG of one micro-batch chunk (t, eps, dropout, text noise): a function of (seed, step, chunk) only,
    so DDP and one process draw the same numbers for the same images, and resume needs no RNG state.
    stream=1: a second generator of the chunk (mDT's token mask, drawn on the host: device="cpu")."""
    g = torch.Generator(device=device)  # the stream offset sits in the low 32 bits: all that a CPU generator keeps
    g.manual_seed((seed * 1_000_003 + step) * 4099 + chunk + stream * 0x9E3779B9)
    return g


# ----------------------------------------------------------------------------- small helpers
def lr_at(step, lr, warmup, decay=0, max_steps=0):
    """Linear warm-up, then constant (the paper trains at a constant lr): lr * min(1, (step + 1) / warmup), so
    step 0 trains at lr / warmup and step warmup - 1 reaches lr. decay > 0: the last `decay` steps before max_steps
    ramp linearly down to 0 (a short-run deviation, --lr-decay; the last step trains at lr / decay)."""
    cool = min(1.0, (max_steps - step) / decay) if decay else 1.0
    return lr * min(1.0, (step + 1) / max(warmup, 1), cool)


def ema_decay_at(step, decay):
    """EMA decay warmed up as min(decay, (1 + n) / (10 + n)), so that short runs get a useful average."""
    return min(decay, (1 + step) / (10 + step))


def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, in fp32 over parameters; buffers are copied."""
    with torch.no_grad():
        ema_p, p = list(ema.parameters()), list(model.parameters())
        torch._foreach_lerp_(ema_p, p, 1.0 - decay)
        for eb, b in zip(ema.buffers(), model.buffers()):
            eb.copy_(b)


def add_to_bins(bin_sum, bin_cnt, t, per_sample):
    """Accumulate per-sample losses (B,) into the LOSS_BINS noise-level bins of their t (diffusion.snr_bin)."""
    b = diffusion.snr_bin(t, len(bin_sum))
    bin_sum.index_add_(0, b, per_sample)
    bin_cnt.index_add_(0, b, torch.ones_like(per_sample))


def loss_by_t(bin_sum, bin_cnt):
    """Mean loss per noise-level bin, as the log reports it (minRF-style diagnostic); an empty bin reports 0."""
    return (bin_sum / bin_cnt.clamp(min=1)).tolist()


# ----------------------------------------------------------------------------- main, in steps
def setup(args):
    """DDP (run.init_distributed: torchrun sets RANK, one process takes the same path), print0, micro-batch,
    seed, precision, out dir."""
    run = types.SimpleNamespace(bar=None)
    run.ddp, run.rank, run.world, run.device = runlib.init_distributed(args.device)
    run.master = run.rank == 0

    def print0(*a):
        if run.master:
            (run.bar.write if run.bar is not None else print)(" ".join(str(x) for x in a))
            sys.stdout.flush()
    run.print0 = print0
    torch.manual_seed(args.seed)  # the same model init on every rank; per-rank seeds follow in build()
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run.dtype = runlib.get_dtype(args.precision, run.device)
    run.autocast = runlib.autocast(run.device, run.dtype)
    os.makedirs(args.out_dir, exist_ok=True)
    run.ckpt_path, run.log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
    run.tb, run.wandb = dashboards(args, run.master)
    return run


def dashboards(args, master):
    """(TensorBoard SummaryWriter or None, the wandb module or None), on the master only. A missing package is a
    one-line error naming the flag, before any work."""
    tb = wb = None
    if args.tensorboard and master:
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: only --tensorboard needs the package
        except ImportError:
            runlib.refuse("--tensorboard needs the tensorboard package: pip install tensorboard")
        tb = SummaryWriter(os.path.join(args.out_dir, "tb"))
    if args.wandb and master:
        try:
            import wandb  # optional: only --wandb needs it
        except ImportError:
            runlib.refuse("--wandb needs the wandb package: pip install wandb")
        wandb.init(project="cond-diffusion", dir=args.out_dir, config=vars(args), resume="allow",
                   id=os.path.basename(os.path.abspath(args.out_dir)))
        wb = wandb
    return tb, wb


def split_batch(args, run, spec, frozen_params):
    """The global batch over ranks and micro-steps: --grad-accum as given, or auto (on CUDA the memory plan's
    largest micro-batch for this card, printed; 1 elsewhere). Sets run.micro and args.grad_accum (an int)."""
    if args.global_batch % run.world:
        runlib.refuse(f"--global-batch {args.global_batch} must divide by the world size {run.world}")
    per_rank = args.global_batch // run.world
    if args.grad_accum == "auto":
        args.grad_accum = 1
        if run.device.type == "cuda":
            card = torch.cuda.get_device_properties(run.device).total_memory / 2**30
            plan = runlib.plan_micro_batch(runlib.memory_per_card(spec, frozen_params), per_rank, card)
            if plan is None:
                runlib.refuse(f"--grad-accum auto: not one image of this model fits the card's {card:.1f} GiB")
            args.grad_accum = plan[1]
            run.print0(f"--grad-accum auto: per-card batch {per_rank} = micro-batch {plan[0]} x {plan[1]} "
                       f"(plan {plan[2]:.1f} GiB of the card's {card:.1f} GiB)")
    if per_rank % args.grad_accum:
        runlib.refuse(f"--grad-accum {args.grad_accum}: the per-rank batch {per_rank} (--global-batch "
                      f"{args.global_batch} over {run.world} rank(s)) does not divide by it")
    run.micro = per_rank // args.grad_accum


def load_data(args, run):
    """The dataset and the frozen networks outside the model (VAE, text encoder)."""
    ds = data.build_dataset(args.data, args.data_path, resolution=args.resolution, crop=args.crop,
                            flip=runlib.data_flip(args),
                            seed=args.seed)
    runlib.check_source(args, ds)  # before minutes of loading frozen networks
    vae = latents.get_vae(args.vae, str(run.device)) if args.vae != "none" and args.data != "latents" else None
    enc = conditioning.get_text_encoder(args.text_encoder, args.text_encoder_path, str(run.device)) \
        if args.semantic == "text" else None
    return ds, vae, enc


def build(args, run, spec):
    """Model (from the spec), its EMA copy and the optimiser; then the per-rank seeds."""
    model = models.build_model(**spec["model"]).to(run.device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.adam_betas),
                                  weight_decay=args.weight_decay, fused=run.device.type == "cuda")
    torch.manual_seed(args.seed + run.rank)  # per-rank seeds (nanoGPT); the training noise uses chunk_generator
    random.seed(args.seed + run.rank)
    np.random.seed(args.seed + run.rank)
    return model, ema, optimizer


def resume(args, run, spec, model, ema, optimizer, src=None):
    """Resume from <out-dir>/ckpt.pt (same run spec required), or take weights from --init-from. Returns the
    checkpoint resumed from (None for a fresh run) and the step."""
    if args.resume and os.path.exists(run.ckpt_path):
        ck = runlib.read_checkpoint(run.ckpt_path)
        diff = runlib.spec_diff(ck["spec"], spec)
        if diff:
            runlib.refuse(f"{run.ckpt_path} has another run spec ({'; '.join(diff)}); use a new --out-dir or --no-resume")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        optimizer.load_state_dict(ck["optimizer"])
        rngs = ck["rng"]
        runlib.set_rng_state(rngs[run.rank] if len(rngs) == run.world else rngs[0], run.device)
        run.print0(f"resumed from {run.ckpt_path} at step {ck['step']} (data position {ck['data']})")
        if run.master and os.path.exists(run.log_path):  # drop log lines of the lost steps
            keep = [ln for ln in open(run.log_path) if json.loads(ln)["step"] <= ck["step"]]
            open(run.log_path, "w").writelines(keep)
        return ck, ck["step"]
    if src is not None:
        sd = src.get("ema", src.get("model", src)) if isinstance(src, dict) else src
        res = model.load_state_dict(sd, strict=False)
        ema.load_state_dict(model.state_dict())
        run.print0(f"init from {args.init_from}: missing {res.missing_keys}, unexpected {res.unexpected_keys}")
    return None, 0


def grid_labels(spec, ds):
    """(labels, columns) of the periodic training grid: every class (up to 10) x 4 seeds, or 4 captions x 4."""
    if spec["semantic"]["kind"] == "class":
        k = min(spec["semantic"]["num_classes"], 10)
        return [c for _ in range(4) for c in range(k)], k
    caps = [s["caption"] for s in data.first_items(ds, 4)] or ["a photo"]
    return [c for _ in range(4) for c in caps], len(caps)


# ----------------------------------------------------------------------------- the loop's parts
class Nets(typing.NamedTuple):
    """What the loop trains and what it runs frozen: the model, its EMA, the optimiser, the VAE and text encoder."""
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    vae: object = None
    encoder: object = None


def make_batches(args, run, ds, ck, step):
    """(endless micro-batch iterator, position(step) -> data position for the checkpoint). Map-style datasets: exact,
    a function of the step (StepSampler); shard streams: the samples of this rank's stream consumed so far."""
    if isinstance(ds, torch.utils.data.IterableDataset):
        pos = stream_position(ck, run) if ck else {"epoch": 0, "index": 0}
        return stream_batches(ds, run.micro, args.num_workers, pos), lambda step: dict(pos)
    sampler = StepSampler(len(ds), args.seed, step, run.micro, run.world, run.rank, args.grad_accum)
    loader = torch.utils.data.DataLoader(  # the generator keeps DataLoader from drawing on the global RNG
        EpochIndexed(ds), batch_sampler=sampler, num_workers=args.num_workers, collate_fn=data.collate,
        pin_memory=run.device.type == "cuda", persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed))
    return iter(loader), sampler.position


def stream_position(ck, run):
    """This rank's position in its shard stream, from a checkpoint that stores every rank's (a list, one per rank:
    ranks that skipped different numbers of bad samples stand at different places) or one for all (one process)."""
    pos = ck["data"]
    if isinstance(pos, dict):
        return dict(pos)
    if len(pos) != run.world:
        runlib.refuse(f"{run.ckpt_path} holds the shard-stream positions of {len(pos)} ranks; resume with "
               f"--nproc_per_node {len(pos)} (a stream position does not carry over to another world size)")
    return dict(pos[run.rank])


def get_micro_batch(batches, meter, args, run, spec, nets, null_sem, g):
    """Next micro-batch -> (x0, cond) on the device: VAE encoding, text features, padding and condition dropout
    happen here. Unreadable samples are counted in meter.n_bad; a batch that lost all of them is skipped."""
    b = next(batches)
    meter.count(b)
    while "phi" not in b:  # every sample of the batch was unreadable (data.collate dropped them)
        b = next(batches)
        meter.count(b)
    sem, device = spec["semantic"], run.device
    x0 = (b["latent"] if "latent" in b else b["image"]).to(device, non_blocking=True)
    with torch.no_grad():
        if nets.vae is not None:
            x0 = latents.encode(nets.vae, x0, spec["latent"]["scale"])
        cond = conditioning.semantic_cond(sem, b.get("y") if sem["kind"] == "class" else b["caption"], nets.encoder,
                                          device, training=True, generator=g)
    if runlib.takes_phi(spec["model"]):
        cond["phi"] = b["phi"].to(device).float()
    return x0.float(), conditioning.drop_conditions(cond, args.p_drop_sem, args.p_drop_ctrl, null_sem, g)


def flops_per_image(run, spec, nets, sched):
    """Training FLOPs of one image, counted once by torch's FlopCounterMode on a synthetic batch (for MFU; GPU
    only: None where the device's peak is unknown)."""
    if runlib.device_peak(run.device)[1] is None:
        return None
    sem, device = spec["semantic"], run.device
    x0 = torch.randn(1, *data.latent_shape(spec["latent"], spec["data"]["resolution"]), device=device)
    cond = conditioning.semantic_cond(sem, [0] if sem["kind"] == "class" else ["a photo"], nets.encoder, device)
    cond.update(phi=runlib.default_phi(spec, 1).to(device), keep_ctrl=torch.ones(1, device=device))
    with run.autocast:
        flops = runlib.count_flops(lambda: diffusion.loss_fn(nets.model, sched, x0, cond)[0])[1]
    nets.model.zero_grad(set_to_none=True)
    return flops


def checkpoint_state(args, run, spec, nets, step, data_pos, stream=False):
    """What a checkpoint holds: the unwrapped model, EMA, optimiser, step, run spec, args, every rank's RNG state
    (so a resumed rank continues its own stream) and the data position."""
    rngs = runlib.gather_ranks(runlib.rng_state(run.device), run.ddp, run.world)
    if run.ddp and stream:  # shard streams: every rank's own position
        data_pos = runlib.gather_ranks(data_pos, run.ddp, run.world)
    return {"model": nets.model.state_dict(), "ema": nets.ema.state_dict(), "optimizer": nets.optimizer.state_dict(),
            "step": step, "spec": spec, "args": vars(args), "rng": rngs, "data": data_pos}


def save_checkpoints(args, run, state):
    """ckpt.pt (atomically), ema.safetensors beside it, and with --keep-every a step-named hard link of ckpt.pt
    (ckpt_<step>.pt: same bytes, no second copy on disk; the next atomic write replaces only ckpt.pt's name)."""
    step = state["step"]
    runlib.save_checkpoint(state, run.ckpt_path)
    runlib.save_safetensors(state["ema"], state["spec"], state["args"], step,
                            os.path.join(args.out_dir, runlib.EMA_FILE))
    kept = ""
    if args.keep_every and step % args.keep_every == 0:
        path = os.path.join(args.out_dir, f"ckpt_{step:07d}.pt")
        if os.path.exists(path):
            os.remove(path)
        try:
            os.link(run.ckpt_path, path)
        except OSError:  # file systems without hard links: a copy
            shutil.copyfile(run.ckpt_path, path)
        kept = f" (kept as {path})"
    run.print0(f"step {step}: checkpoint saved to {run.ckpt_path} and {runlib.EMA_FILE}{kept}")


def check_finite(meter, run, step):
    """NaN/inf anywhere since the last check stops the run before a bad checkpoint can be written."""
    bad = meter.nonfinite.clone()
    if run.ddp:
        dist.all_reduce(bad)
    if bad.item() > 0:
        run.print0(f"ERROR: non-finite loss before step {step}; stopping. The last good checkpoint "
                   f"{run.ckpt_path} is left untouched (try a lower --lr or --precision fp32).")
        if run.ddp:
            dist.destroy_process_group()
        sys.exit(1)


def write_grid(args, run, spec, ema, grid, tag):
    """EMA samples of the grid's labels (grid_labels) to <out-dir>/grid_<tag>.png, and the loss curve so far."""
    labels, cols = grid
    imgs = runlib.generate(ema, spec, seeds=list(range(len(labels))), labels=labels, steps=args.sample_steps,
                           cfg=args.sample_cfg, device=run.device, precision=run.dtype)
    data.save_grid(imgs, os.path.join(args.out_dir, f"grid_{tag}.png"), nrow=cols)
    if run.tb is not None:
        run.tb.add_images("samples", (imgs + 1) / 2, int(tag) if tag.isdigit() else 0)
    recs = [json.loads(line) for line in open(run.log_path)] if os.path.exists(run.log_path) else []
    if len(recs) > 1:
        data.plot_lines({"loss": ([r["step"] for r in recs], [math.log10(max(r["loss"], 1e-8)) for r in recs])},
                        os.path.join(args.out_dir, "loss.png"), title="training loss (log10)")


class Meter:
    """Sums between two log lines, kept on the device: no .item() (a host sync) inside gradient accumulation."""

    def __init__(self, device):
        self.nonfinite = torch.zeros((), device=device)  # non-finite losses since the start (check_finite)
        self.loss = torch.zeros((), device=device)
        self.bin_sum, self.bin_cnt = torch.zeros(LOSS_BINS, device=device), torch.zeros(LOSS_BINS, device=device)
        self.n_bad = 0  # unreadable samples skipped so far
        self.n_noorig = 0  # shard samples whose key.json gave no original size: their φ size is the decoded one
        self.reset()

    def count(self, batch):
        """What data.collate counted in a batch: unreadable samples, and samples without an original size."""
        self.n_bad += batch["n_bad"]
        self.n_noorig += batch.get("n_noorig", 0)

    def reset(self):
        self.loss.zero_(), self.bin_sum.zero_(), self.bin_cnt.zero_()
        self.steps, self.imgs, self.t0 = 0, 0, time.time()

    def add(self, loss, t, per_sample, grad_accum):
        """One micro-step's loss (B,) per sample, for the mean, the t bins and the finite check."""
        self.loss += loss.detach() / grad_accum
        self.nonfinite += (~torch.isfinite(loss.detach())).float()
        add_to_bins(self.bin_sum, self.bin_cnt, t, per_sample.detach())


def log_record(meter, run, step, lr, gnorm, flops_img):
    """One log record over all ranks (mean loss, loss by t, img/s, memory, MFU), printed as one fixed-format line;
    the master appends it to log.jsonl."""
    stats = torch.cat([meter.loss.view(1) / meter.steps, meter.bin_sum, meter.bin_cnt])
    if run.ddp:
        dist.all_reduce(stats)
        stats[0] /= run.world
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    ips = meter.imgs / (time.time() - meter.t0)
    mem = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    bins = loss_by_t(stats[1:1 + LOSS_BINS], stats[1 + LOSS_BINS:])
    peak = runlib.device_peak(run.device)[1]
    rec = dict(step=step, loss=stats[0].item(), lr=lr, grad_norm=gnorm.item(), img_per_s=ips, mem_gb=mem,
               n_bad=meter.n_bad, n_noorig=meter.n_noorig, mfu=flops_img * ips / run.world / peak if flops_img else None, loss_by_t=bins)
    mfu = f" | mfu {100 * rec['mfu']:5.1f}%" if rec["mfu"] is not None else ""
    noorig = f" | no original size {meter.n_noorig}" if meter.n_noorig else ""  # size conditioning without signal
    run.print0(f"step {step:7d} | loss {rec['loss']:.4f} | lr {lr:.2e} | gnorm {rec['grad_norm']:7.3f} | "
               f"{ips:8.1f} img/s | mem {mem:6.2f} GB{mfu} | loss@t " + " ".join(f"{v:.3f}" for v in bins) + noorig)
    if run.master:
        with open(run.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        dashboard_scalars(run, rec)


def dashboard_scalars(run, rec):
    """One log record to TensorBoard / wandb (when on): every number of the record, loss per t bin as loss_t/k."""
    scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
    scalars.update({f"loss_t/{k}": v for k, v in enumerate(rec["loss_by_t"])})
    if run.tb is not None:
        for k, v in scalars.items():
            run.tb.add_scalar(k, v, rec["step"])
        run.tb.flush()
    if run.wandb is not None:
        run.wandb.log(scalars, step=rec["step"])


# ----------------------------------------------------------------------------- the loop
def train_loop(args, run, spec, ds, nets, ck, step):
    """lr -> periodic grid / checkpoint -> grad accumulation -> clip -> step -> EMA -> log."""
    batches, data_position = make_batches(args, run, ds, ck, step)
    stream = isinstance(ds, torch.utils.data.IterableDataset)  # its position is per rank
    sched = diffusion.make_schedule(**spec["schedule"], device=run.device)
    null_sem = conditioning.semantic_null(spec["semantic"], nets.encoder, run.device)
    flops_img = flops_per_image(run, spec, nets, sched)
    model = torch.compile(nets.model) if args.compile else nets.model  # checkpoints hold the unwrapped model
    if run.ddp:
        # gradients as views of DDP's all-reduce buckets: no second copy of the grads (4 bytes/param; bench.py's
        # memory plan counts on it)
        model = DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    grid, meter, start_step = grid_labels(spec, ds), Meter(run.device), step
    run.bar = tqdm(total=args.max_steps, initial=step, disable=not (run.master and args.progress), dynamic_ncols=True)
    while True:
        # --- lr: linear warm-up, then constant (the paper trains at a constant lr)
        lr = lr_at(step, args.lr, args.warmup, args.lr_decay, args.max_steps)
        for group in nets.optimizer.param_groups:
            group["lr"] = lr
        # --- periodic sample grid / checkpoint (not at the step we just resumed from: it is on disk already)
        last, t_io = step == args.max_steps, time.time()
        if step != start_step or (last and ck is None):
            if run.master and args.sample_every > 0 and (step % args.sample_every == 0 or last):
                write_grid(args, run, spec, nets.ema, grid, f"{step:07d}")
            if args.ckpt_every and (step % args.ckpt_every == 0 or last):
                check_finite(meter, run, step)
                state = checkpoint_state(args, run, spec, nets, step, data_position(step), stream)
                if run.master:
                    save_checkpoints(args, run, state)
        meter.t0 += time.time() - t_io  # img/s counts training time only
        if last:
            break
        # --- gradient accumulation: DDP syncs gradients only on the last micro-step
        model.train()
        for k in range(args.grad_accum):
            chunk = k * run.world + run.rank  # this micro-batch's place in the global batch
            g = chunk_generator(args.seed, step, chunk, run.device)
            x0, cond = get_micro_batch(batches, meter, args, run, spec, nets, null_sem, g)
            cond["mask_generator"] = chunk_generator(args.seed, step, chunk, "cpu", stream=1)  # mDT's token mask
            t = sched.sample_t(x0.shape[0], generator=g, device=run.device)  # model times
            eps = torch.randn(x0.shape, generator=g, device=run.device)
            skip_sync = run.ddp and k < args.grad_accum - 1
            with model.no_sync() if skip_sync else contextlib.nullcontext():
                with run.autocast:
                    loss, per_sample, t = diffusion.loss_fn(model, sched, x0, cond, t, eps)
                (loss / args.grad_accum).backward()
            meter.add(loss, t, per_sample, args.grad_accum)
        # --- clip (the norm is computed even without clipping, for the log)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
        # --- optimiser step
        nets.optimizer.step()
        nets.optimizer.zero_grad(set_to_none=True)
        # --- EMA (decay warmed up so that short runs get a useful average)
        ema_update(nets.ema, nets.model, ema_decay_at(step, args.ema_decay))
        step += 1
        meter.steps, meter.imgs = meter.steps + 1, meter.imgs + args.global_batch
        run.bar.update(1)
        # --- log: one fixed-format line + the same as JSON
        if step % args.log_every == 0 or step == args.max_steps:
            check_finite(meter, run, step)
            log_record(meter, run, step, lr, gnorm, flops_img)
            meter.reset()
    run.bar.close()
    if run.tb is not None:
        run.tb.close()


def settings_table(args, run, spec, n_params):
    """The resolved settings, one per line, so that a user sees what will run (the full set is config.json)."""
    m, lat, sch = spec["model"], spec["latent"], spec["schedule"]
    rows = [("recipe", f"{args.recipe} ({'the CPU job' if args.size == 'tiny' else 'the paper run, §4 / Tab. A4'})"),
            ("model", f"{m['arch']}-{args.size}, {n_params / 1e6:.2f} M params"),
            ("data", f"{args.data} {args.data_path or ''} at {args.resolution} px, crop {args.crop}, "
                     f"flip {runlib.data_flip(args)}"),
            ("latent", lat["vae"] or "pixels"),
            ("batch", f"{args.global_batch} = {run.world} rank(s) x micro-batch {run.micro} x accum {args.grad_accum}"),
            ("optim", f"lr {args.lr:g} (warm-up {args.warmup}), betas {tuple(args.adam_betas)}, wd "
                      f"{args.weight_decay:g}, clip {args.grad_clip:g}, EMA {args.ema_decay:g}"),
            ("steps", f"{args.max_steps}"),
            ("diffusion", f"{sch['objective']}, t ~ {sch['t_density']}, schedule scale {sch['scale']:g}"),
            ("control", f"{m.get('control') or 'none'}, gamma {m.get('gamma', '-')}"),
            ("system", f"{run.device}, {str(run.dtype).split('.')[-1]}, compile {args.compile}")]
    return "\n".join(f"  {k:<10} {v}" for k, v in rows)


def adopt_init_flags(args, set_by):
    """--init-from a transfer.py file: the train.py flags its run spec needs (stored in the file) become this run's
    settings, except where a flag is given (a given flag that disagrees is refused after the spec is resolved,
    naming it). Returns the file's checkpoint dict, or None without --init-from."""
    if not args.init_from:
        return None
    src = runlib.read_checkpoint(args.init_from, "--init-from")
    for flag, v in (src.get("transfer") or {}).get("flags", {}).items():
        dest = flag[2:].replace("-", "_")
        if set_by.get(dest) != "flag":
            setattr(args, dest, v)
            set_by[dest] = "init-from"
    return src


def check_init_spec(args, src, spec):
    """The fine-tune's run spec must be the --init-from file's (model, latent, semantic, schedule)."""
    bad = runlib.init_conflicts(src["spec"], spec) if src is not None and "spec" in src else []
    if bad:
        runlib.refuse(f"--init-from {args.init_from}: its run spec differs; fix or drop " + "; ".join(bad))


def check_flags(args, set_by):
    """Flags that cannot make the run asked for: one line naming the flag, before anything is written."""
    if args.size != "tiny" and set_by["data"] != "flag":
        runlib.refuse(f"--size {args.size} trains the paper's run: pass its data, --data imagefolder|wds|captions|"
                      "latents with --data-path (the embedded toy set is for --size tiny)")
    if not 0 < args.flip_p <= 1:
        runlib.refuse(f"--flip-p {args.flip_p}: a probability in (0, 1] (--no-flip turns flips off)")
    if args.keep_every and (args.keep_every < 0 or not args.ckpt_every or args.keep_every % args.ckpt_every):
        runlib.refuse(f"--keep-every {args.keep_every}: must be a multiple of --ckpt-every {args.ckpt_every}")


def main(argv=None):
    args, set_by = parse(argv)
    explicit = {k for k, v in set_by.items() if v == "flag"}
    src = adopt_init_flags(args, set_by)
    if args.print_config:  # before any data, VAE, text encoder or model is loaded
        spec = runlib.resolve_spec(args, None, explicit=explicit)
        print(json.dumps({"spec": spec, "args": vars(args), "set_by": set_by}))
        return
    check_flags(args, set_by)
    run = setup(args)
    if set_by["compile"] == "scale" and run.device.type != "cuda":
        args.compile = False  # the scale's compile default is for CUDA; on the CPU only an explicit --compile
    if args.grad_accum != "auto":  # a given --grad-accum is checked before anything is loaded
        split_batch(args, run, None, 0)
    ds, vae, encoder = load_data(args, run)
    spec = runlib.resolve_spec(args, ds, vae, encoder, explicit)
    check_init_spec(args, src, spec)
    if args.grad_accum == "auto":  # the memory plan needs the model's spec and the frozen encoders' size
        split_batch(args, run, spec, sum(p.numel() for net in (vae, encoder) if net is not None
                                         for p in net.parameters()))
    model, ema, optimizer = build(args, run, spec)
    ck, step = resume(args, run, spec, model, ema, optimizer, src)
    run.print0(settings_table(args, run, spec, sum(p.numel() for p in model.parameters())))
    if run.master:
        with data.atomic_write(os.path.join(args.out_dir, "config.json"), "w") as f:
            json.dump({"spec": spec, "args": vars(args)}, f, indent=2)
    train_loop(args, run, spec, ds, Nets(model, ema, optimizer, vae, encoder), ck, step)
    if run.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
