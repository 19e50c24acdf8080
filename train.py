r"""
Train a diffusion denoiser (SPEC §6): one process or torchrun DDP, bf16 on GPU, EMA, exact resume.

    python train.py                                   # tiny "ours" mmDiT, embedded data, 16 px pixels, CPU, < 10 min
    torchrun --nproc_per_node=8 train.py --recipe ours --size XL --data imagefolder --data-path /imagenet/train \
        --out-dir runs/in1k256                    # the paper's run: 256 px SD-VAE latents, batch 2048, lr 1e-3
    python train.py --size XL --resolution 512 --print-config    # what a run resolves to, without running it

Rerunning the same command resumes from <out-dir>/ckpt.pt. `--recipe` sets the defaults of a whole
recipe (Tab. A4) and `--size` those of the scale (tiny: the CPU job; S/B/L/XL: the paper's run, §4);
any flag given explicitly overrides them.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import random
import resource
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
import diffusion
import models

# ----------------------------------------------------------------------------- recipes (Tab. A4)
# "ours" = mmDiT++: class/text only through attention, control (crop, size, flip) in adaLN with the cosine
# schedule (alpha 8, Tab. 2a), noisy replicate text padding (beta_txt 0.02, Tab. 3), AdamW (0.9, 0.95), wd 0.03.
RECIPES = {
    "ours": dict(arch="mmdit", class_in="attn", control=["crop", "size", "flip"], gamma="cosine", gamma_alpha=8.0,
                 text_pad="noisy", beta_txt=0.02, adam_betas=[0.9, 0.95], weight_decay=0.03, pe_grid="resample",
                 objective="eps"),
    "sd3": dict(arch="mmdit", class_in="attn", control=[], gamma="uniform", gamma_alpha=8.0,  # SD3 baseline column
                text_pad="zero", beta_txt=0.0, adam_betas=[0.9, 0.999], weight_decay=0.0, pe_grid="extrapolate",
                objective="rf"),  # SD3's own paradigm: rectified flow, logit-normal t (Tab. A4)
    "dit": dict(arch="dit", class_in="adaln", control=[], gamma="uniform", gamma_alpha=8.0,  # plain DiT (Peebles & Xie)
                text_pad="zero", beta_txt=0.0, adam_betas=[0.9, 0.999], weight_decay=0.0, pe_grid="extrapolate",
                objective="eps"),
}
# The tiny CPU default's deviations from Tab. A4, chosen by the tiny-default study (RESULTS.md "What makes the tiny
# default learn", every row measured with the judge): SD3's rectified flow instead of DDPM-eps, and the class embedding also
# in adaLN (the paper's class-in-attention alone is barely used by a 64-wide model in a few thousand steps). On only
# for `--recipe ours --size tiny`; --no-tiny-recipe gives the paper's recipe at tiny size; explicit flags win.
TINY_RECIPE = dict(objective="rf", class_in="adaln")
# Defaults by scale. --size tiny keeps the CPU job (the parser's own defaults: embedded data, 16 px pixels, lr 2e-3,
# batch 32, 2400 steps). At S/B/L/XL every default is the paper's run (§4, Tab. A2, Tab. A4); explicit flags win.
PAPER_SCALE = dict(
    resolution=256,  # §4: pre-training at 256 x 256 (512 is fine-tuned from it, transfer.py)
    vae=data.DEFAULT_VAE,  # §3.1 / SPEC §5: latent diffusion on the SD VAE's latents (sd-vae-ft-ema)
    lr=1e-3,  # §4: "a constant learning rate of 10 x 10^-4" at batch 2048; Tab. A2: the largest that does not diverge
    max_steps=600_000,  # §4: 500k-1M iterations on ImageNet-1k (300k-500k on CC12M); 600k = Tab. 4a's IN1k run
    ema_decay=0.9999,  # deviation: the paper states no EMA; DiT's 0.9999
    warmup=1000,  # deviation: the paper's lr is constant from step 0; 1000 linear warm-up steps guard the first updates
)
PAPER_BATCH = {256: 2048, 512: 384}  # §4: global batch 2048 at 256 px (2 x 8 A100), 384 at 512 px (16 A100)
PAPER_CROP = {"ours": "local", "sd3": "global", "dit": "global"}  # Tab. A4 "low res. pretrain. crop scale": at 256

LOSS_BINS = 4  # loss logged in 4 bins of t (minRF-style diagnostic)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R = "(default: set by --recipe)"
    p.add_argument("--recipe", choices=list(RECIPES), default="ours", help="preset of Tab. A4: ours (mmDiT++), sd3 "
                   "(mmDiT baseline, rectified flow) or dit (plain DiT); explicit flags override it (default: ours)")
    p.add_argument("--tiny-recipe", action=argparse.BooleanOptionalAction, default=True, help="with --recipe ours "
                   f"--size tiny, apply the CPU study's deviations {TINY_RECIPE} (default: on)")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=data.SOURCES, default="embedded", help="dataset source; 'embedded' needs no files")
    g.add_argument("--data-path", default=None, help="dataset root / shard pattern (unused for 'embedded')")
    g.add_argument("--resolution", type=int, default=data.RESOLUTION, help="training resolution in pixels (default: "
                   f"{data.RESOLUTION} at --size tiny, the CPU run; 256 at S/B/L/XL, §4)")
    g.add_argument("--crop", choices=data.CROPS, default="global",
                   help="crop scale: global [0.9,1], local [0.4,0.6], mix [0.4,1] of min(H,W) (§2.2); center: the centred "
                   "min(H,W) square, flipped like the others unless --no-flip (default: global; at "
                   "S/B/L/XL local for --recipe ours, Tab. A4)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="random h-flip, p=0.5 (on)")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per rank (default: 0)")
    g.add_argument("--vae", default="none", help="'none' = pixel space; else a diffusers AutoencoderKL name/path, "
                   f"e.g. {data.DEFAULT_VAE}, to train on its latents (default: none at --size tiny; "
                   f"{data.DEFAULT_VAE} at S/B/L/XL)")
    g.add_argument("--semantic", choices=["class", "text"], default="class", help="semantic condition (default: class)")
    g.add_argument("--num-classes", type=int, default=None, help="class count (default: taken from the dataset)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=list(models.MODELS), default=None, help=f"denoiser {R}")
    g.add_argument("--size", choices=list(models.SIZES), default="tiny", help="size preset (default: tiny)")
    g.add_argument("--width", type=int, default=None, help="transformers: hidden width instead of the preset's, heads "
                   "keep the preset's head width (default: the preset's; tiny 64)")
    g.add_argument("--depth", type=int, default=None, help="transformers: blocks instead of the preset's (default: "
                   "the preset's; tiny 4)")
    g.add_argument("--patch-size", type=int, default=2, help="transformer patch size (default: 2)")
    g.add_argument("--class-in", choices=["adaln", "attn"], default=None, help=f"class via adaLN or attention {R}")
    g.add_argument("--pe-grid", choices=["extrapolate", "resample"], default=None, help=f"2-D sin-cos PE grid {R}")
    g.add_argument("--pe-base", type=int, default=None, help="PE grid size of pre-training (default: this grid)")
    g.add_argument("--mask-ratio", type=float, default=0.3, help="mDT latent mask ratio (default: 0.3)")
    g.add_argument("--class-tokens", type=int, default=None, help="context tokens made from the class embedding "
                   "(learned offsets tell them apart): more attention mass on the class (default: the arch's own, "
                   "1 for dit/mmdit, 4 for pixart/unet)")
    g.add_argument("--stem", type=int, default=0, help="transformers: width of a two-layer 3x3 conv stem before "
                   "patchify (minRF), 0 = plain patchify as DiT/SD3 (default: 0)")
    g.add_argument("--head", type=int, default=0, help="transformers: width of a two-layer 3x3 conv head after "
                   "unpatchify that also sees x_t (U-ViT's output conv), 0 = linear output as DiT/SD3 (default: 0)")
    g = p.add_argument_group("diffusion")
    g.add_argument("--schedule-scale", type=float, default=1.0, help="noise schedule scale s'/s, Eq. 3; for rf it "
                   "multiplies --shift (the same operation) (default: 1)")
    g.add_argument("--base-resolution", type=int, default=None, help="pre-training resolution in pixels of a "
                   "fine-tuning run: evaluate.py's guidance default follows Eq. 4 from it (transfer.py sets it; "
                   "default: none = this resolution)")
    g.add_argument("--objective", choices=diffusion.OBJECTIVES, default=None, help="model output: eps, v, x0 (DDPM "
                   f"schedule) or rf (rectified flow, v = eps - x0, Euler sampler) {R}: eps for ours/dit, rf for sd3")
    g.add_argument("--t-density", choices=diffusion.T_DENSITIES, default=None, help="training density of t "
                   "(logit-normal over t/T for the DDPM schedule) (default: logit-normal for rf, uniform otherwise)")
    g.add_argument("--t-mean", type=float, default=0.0, help="m of the logit-normal pi(t; m, s) (default: 0)")
    g.add_argument("--t-std", type=float, default=1.0, help="s of the logit-normal pi(t; m, s) (default: 1)")
    g.add_argument("--shift", type=float, default=1.0, help="rf only: SD3's t' = shift t / (1 + (shift-1) t), in "
                   "training and sampling (default: 1 = none)")
    g.add_argument("--loss-weight", choices=diffusion.LOSS_WEIGHTS, default="none", help="none, or min-snr: "
                   "min(SNR, gamma) in x0 space, expressed for the objective (Hang et al. 2023) (default: none)")
    g.add_argument("--min-snr-gamma", type=float, default=diffusion.MIN_SNR_GAMMA,
                   help=f"gamma of min-snr (default: {diffusion.MIN_SNR_GAMMA:g})")
    g.add_argument("--zero-snr", action=argparse.BooleanOptionalAction, default=False, help="rescale betas to zero "
                   "terminal SNR (Lin et al. 2024); needs --objective v or x0 (default: off)")
    g.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=False, help="clamp predicted x0 to "
                   "[-1, 1] while sampling; pixel space only (default: off)")
    g = p.add_argument_group("conditioning")
    g.add_argument("--control", nargs="*", choices=conditioning.CONTROL_SIGNALS, default=None,
                   help=f"control signals in adaLN; give none for no control {R}")
    g.add_argument("--gamma", choices=conditioning.GAMMA_SCHEDULES, default=None, help=f"gamma_c(t) of Eq. 1 {R}")
    g.add_argument("--gamma-alpha", type=float, default=None, help=f"alpha of the cosine gamma_c {R}")
    g.add_argument("--gamma-step-sigma", type=float, default=1.0, help="threshold of the 'step' gamma_c (default: 1)")
    g.add_argument("--p-drop-sem", type=float, default=0.1, help="semantic dropout prob. for CFG (default: 0.1)")
    g.add_argument("--p-drop-ctrl", type=float, default=0.1, help="control dropout prob. for Eq. 2 (default: 0.1)")
    g.add_argument("--text-encoder", default="ViT-L-14", help="open_clip text tower, or 'tiny' (default: ViT-L-14)")
    g.add_argument("--text-encoder-path", default="openai", help="open_clip pretrained tag or weights file "
                   "(default: openai)")
    g.add_argument("--text-pad", choices=conditioning.TEXT_PADDINGS, default=None, help=f"text padding §2.1 {R}")
    g.add_argument("--beta-txt", type=float, default=None, help=f"noise of noisy replicate padding, Eq. 7 {R}")
    g = p.add_argument_group("optim")
    g.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate, constant after warm-up "
                   "(default: 2e-3 at --size tiny, the CPU run; 1e-3 at S/B/L/XL, §4 at batch 2048)")
    g.add_argument("--adam-betas", type=float, nargs=2, default=None, help=f"AdamW betas {R}")
    g.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay {R}")
    g.add_argument("--global-batch", type=int, default=32, help="images per optimiser step, all ranks "
                   "(default: 32 at --size tiny; at S/B/L/XL 2048 at 256 px and 384 at 512 px, §4)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step (default: 1)")
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay, warmed up as min(d, (1+n)/(10+n)) "
                   "(default: 0.999 at --size tiny; 0.9999 at S/B/L/XL)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip grad norm; 0 = off (default: 1)")
    g.add_argument("--warmup", type=int, default=100, help="linear lr warm-up steps (default: 100 at "
                   "--size tiny; 1000 at S/B/L/XL)")
    g.add_argument("--lr-decay", type=int, default=0, help="linear lr decay to 0 over the last N steps before "
                   "--max-steps; 0 = constant lr, as the paper (default: 0)")
    g.add_argument("--max-steps", type=int, default=2400, help="optimiser steps to train (default: 2400 at "
                   "--size tiny, which with sample.py fits the 10-minute CPU budget on a 2-core Zen 1; 600000 at "
                   "S/B/L/XL, §4)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto = cuda if available)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast dtype; master weights stay fp32 (default: auto = bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model "
                   "(default: off; on 2 idle CPU cores it buys the tiny default 1.2x for ~70 s of compiling)")
    g.add_argument("--seed", type=int, default=0, help="base seed; rank r uses seed + r (default: 0)")
    g = p.add_argument_group("io")
    g.add_argument("--out-dir", default="out", help="checkpoints, config.json, log.jsonl, grids (default: out)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="resume from <out-dir>/ckpt.pt when it exists (default: on)")
    g.add_argument("--init-from", default=None, help="initialise weights from a checkpoint (e.g. transfer.py "
                   "output), strict=False with a report of missing/unexpected keys")
    g.add_argument("--ckpt-every", type=int, default=500, help="checkpoint interval in steps (default: 500)")
    g.add_argument("--sample-every", type=int, default=1000, help="sample grid interval in steps, and one at the "
                   "end; 0 = no grids (default: 1000)")
    g.add_argument("--log-every", type=int, default=50, help="log interval in steps (default: 50)")
    g.add_argument("--sample-steps", type=int, default=50, help="sampling steps of the periodic grids (default: 50)")
    g.add_argument("--sample-cfg", type=float, default=4.0,
                   help="guidance lam of the periodic grids (default: 4, as DiT's sample grids; FID uses 1.5)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar (default: on)")
    g.add_argument("--print-config", action="store_true", help="print {\"spec\": run spec, \"args\": ...} (what "
                   "config.json would hold; spec entries that need the data or the VAE are null) and exit")
    return p


def parse_args(argv=None):
    """Two passes: read --recipe, install its values as defaults, then parse; explicit flags win."""
    p = get_parser()
    first = p.parse_known_args(argv)[0]
    p.set_defaults(**RECIPES[first.recipe])
    if first.recipe == "ours" and first.size == "tiny" and first.tiny_recipe:
        p.set_defaults(**TINY_RECIPE)
    if first.size != "tiny":  # the paper's run; the global batch follows the resolution (§4)
        p.set_defaults(**PAPER_SCALE)
        res = p.parse_known_args(argv)[0].resolution
        p.set_defaults(global_batch=PAPER_BATCH.get(res, PAPER_BATCH[256]),  # fine-tuning above 256: global crops
                       crop=PAPER_CROP[first.recipe] if res <= PAPER_SCALE["resolution"] else "global")
    args = p.parse_args(argv)
    args.t_density = args.t_density or diffusion.default_t_density(args.objective)  # stored resolved
    try:  # refuse combinations the schedule cannot sample (eps + zero-snr, shift without rf) before any work
        diffusion.schedule_from_args(vars(args))
    except ValueError as e:
        p.error(str(e))
    return args


def explicit_flags(argv=None):
    """dests of the flags given on the command line (not from a default or the recipe)."""
    p = get_parser()
    for a in p._actions:
        a.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------- the run spec
# One plain dict, resolved once right after parsing; it goes into config.json and every checkpoint, and
# sample.py / evaluate.py / transfer.py / resume rebuild from it, never from their own defaults:
#   model    build_model's arguments: arch, size and exactly the constructor keywords (models.build_model(**m))
#   latent   vae (None = pixels), scale, channels, down  (from the shards' meta.json for --data latents)
#   semantic class: num_classes, null_id | text: encoder, pretrained, pad, beta_txt, dim, pooled_dim
#   schedule make_schedule's arguments: scale (Eq. 3), objective, shift, t density, loss weight, zero-snr, clip
#   data     source, path, resolution, crop, flip, seed, orig_size (sample.py's default size condition)
MODEL_FLAGS = ("patch_size", "class_in", "pe_grid", "pe_base", "mask_ratio", "control", "gamma", "gamma_alpha",
               "gamma_step_sigma", "stem", "head", "class_tokens")  # constructor keywords (where the arch takes them)
SPEC_KEYS = ("model", "latent", "semantic", "schedule")  # what a resumed run must share with its checkpoint


def refuse(msg):
    raise SystemExit(f"train.py: {msg}")


def _flag(dest):
    return "--" + dest.replace("_", "-")


def resolve_latent(args, ds, vae, explicit):
    """Pixels, the --vae's latents, or for --data latents the VAE the shards were encoded with (meta.json)."""
    if args.data != "latents":
        if args.vae == "none":
            return dict(data.PIXELS)
        if vae is not None:
            return data.vae_latent(args.vae, vae)
        sd = args.vae == data.DEFAULT_VAE  # --print-config: no VAE loaded; the SD VAE's constants are known
        return dict(vae=args.vae, scale=data.VAE_SCALE if sd else None, channels=data.LATENT_CH if sd else None,
                    down=data.VAE_DOWN if sd else None)
    if ds is None:  # --print-config: the shards' meta.json is not read
        return dict(vae=None, scale=None, channels=None, down=None)
    lat = dict(ds.latent)
    if "vae" in explicit and args.vae != (lat["vae"] or "none"):
        refuse(f"--vae {args.vae}: these latent shards were encoded with {lat['vae']!r} (meta.json); drop --vae")
    if "resolution" in explicit and ds.resolution and args.resolution != ds.resolution:
        refuse(f"--resolution {args.resolution}: these latent shards are {ds.resolution} px (meta.json)")
    return lat


def resolve_semantic(args, ds, encoder):
    """Class count and null id (the dataset's own count unless --num-classes), or the text encoder set-up."""
    if args.semantic == "text":
        if ds is not None and "caption" not in (data.first_items(ds, 1) or [{}])[0]:
            refuse(f"--semantic text: --data {args.data} has no captions (embedded, captions, wds and latent shards of "
                   "captioned data have)")
        return dict(kind="text", encoder=args.text_encoder, pretrained=args.text_encoder_path, pad=args.text_pad,
                    beta_txt=args.beta_txt, dim=encoder and encoder.dim, pooled_dim=encoder and encoder.pooled_dim)
    n = args.num_classes or getattr(ds, "num_classes", None)
    if not n and ds is not None:
        refuse(f"--semantic class: --data {args.data} has no class labels; pass --num-classes or --semantic text")
    return dict(kind="class", num_classes=n, null_id=n)  # null = the last row of the label table


def resolve_model(args, latent, semantic, explicit):
    """build_model's arguments. A flag the arch does not take (or a --class-in it has no mode for) is dropped when
    it comes from a default or the recipe, and refused in one line when given explicitly. Class flags do not apply
    in text mode, gamma flags not without control."""
    arch, cls = args.arch, models.MODELS[args.arch]
    takes = models.arch_kwargs(arch)
    if semantic["kind"] == "text" and not cls.supports_text:
        refuse(f"--semantic text: --arch {arch} is class-conditional only (paper Tab. 1)")
    C, R, _ = data.latent_shape(latent, args.resolution) if latent["down"] else (None, None, None)
    kw = {k: v for k, v in dict(input_size=R, in_channels=C).items() if k in takes}
    kw.update(dict(num_classes=semantic["num_classes"]) if semantic["kind"] == "class" else
              dict(text_dim=semantic["dim"], pooled_dim=semantic["pooled_dim"]))
    for k in MODEL_FLAGS:
        v = getattr(args, k)
        if k in ("class_in", "class_tokens") and semantic["kind"] == "text" or v is None and k == "class_tokens":
            continue  # the class embedding does not exist in text mode; None = the arch's own token count
        if k.startswith("gamma") and not args.control:
            if k in explicit:
                refuse(f"{_flag(k)} needs control conditioning (--control crop size flip)")
            continue
        if k in takes and (k != "class_in" or v in cls.class_in_modes):
            kw[k] = list(v) if k == "control" else v
        elif k in explicit:
            modes = f" (it has {', '.join(cls.class_in_modes)})" if k == "class_in" and k in takes else ""
            refuse(f"{_flag(k)} {v} does not apply to --arch {arch}{modes}")
    if kw.get("gamma") == "step" and "schedule_scale" in takes:  # its delta(sigma_t <= c) reads the Eq. 3 sigma
        kw["schedule_scale"] = args.schedule_scale
    return dict(arch=arch, size=resolve_size(args), **kw)


def resolve_size(args):
    """The --size preset's name, or its dict with --width / --depth put in (heads keep the preset's head width)."""
    if args.width is None and args.depth is None:
        return args.size
    if args.arch == "unet":
        refuse("--width / --depth: the UNet's size is its channel tuple; pick --size")
    size = dict(models.SIZES[args.size])
    head_dim = size["hidden"] // size["heads"]
    if args.width is not None:
        if args.width % head_dim:
            refuse(f"--width {args.width}: must be a multiple of the {args.size} preset's head width {head_dim}")
        size.update(hidden=args.width, heads=args.width // head_dim)
    if args.depth is not None:
        size["depth"] = args.depth
    return size


def resolve_spec(args, ds, vae=None, encoder=None, explicit=frozenset()):
    """The run spec of parsed args over dataset ds (+ the loaded VAE / text encoder whose widths it records)."""
    latent = resolve_latent(args, ds, vae, explicit)
    if args.data == "latents" and ds is not None and ds.resolution:
        args.resolution = ds.resolution
    semantic = resolve_semantic(args, ds, encoder)
    d = dict(source=args.data, path=args.data_path, resolution=args.resolution, crop=args.crop, flip=args.flip,
             seed=args.seed, orig_size=data.typical_orig_size(ds) if ds is not None else None,
             base_resolution=args.base_resolution)
    if args.data == "latents":  # the images the shards came from (evaluate.py --ref train)
        d["images"] = ds.meta.get("source") if ds is not None else None
    return dict(model=resolve_model(args, latent, semantic, explicit), latent=latent, semantic=semantic,
                schedule=diffusion.schedule_spec(vars(args)), data=d)


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


def rng_state(device):
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s, device):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


# ----------------------------------------------------------------------------- main, in steps
def setup(args):
    """DDP (models.init_distributed: torchrun sets RANK, one process takes the same path), print0, micro-batch,
    seed, precision, out dir."""
    run = types.SimpleNamespace(bar=None)
    run.ddp, run.rank, run.world, run.device = models.init_distributed(args.device)
    run.master = run.rank == 0

    def print0(*a):
        if run.master:
            (run.bar.write if run.bar is not None else print)(" ".join(str(x) for x in a))
            sys.stdout.flush()
    run.print0 = print0
    assert args.global_batch % (run.world * args.grad_accum) == 0, (
        f"--global-batch {args.global_batch} must divide by world size {run.world} x --grad-accum {args.grad_accum}; "
        f"pick a global batch that is a multiple of {run.world * args.grad_accum}")
    run.micro = args.global_batch // (run.world * args.grad_accum)
    torch.manual_seed(args.seed)  # the same model init on every rank; per-rank seeds follow in build()
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run.dtype = models.get_dtype(args.precision, run.device)
    run.autocast = models.autocast(run.device, run.dtype)
    os.makedirs(args.out_dir, exist_ok=True)
    run.ckpt_path, run.log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
    return run


def load_data(args, run):
    """The dataset and the frozen networks outside the model (VAE, text encoder)."""
    ds = data.build_dataset(args.data, args.data_path, resolution=args.resolution, crop=args.crop, flip=args.flip,
                            seed=args.seed)
    vae = data.get_vae(args.vae, str(run.device)) if args.vae != "none" and args.data != "latents" else None
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


def resume(args, run, spec, model, ema, optimizer):
    """Resume from <out-dir>/ckpt.pt (same run spec required), or take weights from --init-from. Returns the
    checkpoint resumed from (None for a fresh run) and the step."""
    if args.resume and os.path.exists(run.ckpt_path):
        ck = models.read_checkpoint(run.ckpt_path)
        old = {**ck["spec"], "schedule": diffusion.schedule_spec(ck["spec"]["schedule"])}  # older: fewer keys
        diff = [f"{k}.{f}: {old[k].get(f)!r} -> {spec[k].get(f)!r}" for k in SPEC_KEYS
                for f in sorted(set(old[k]) | set(spec[k])) if old[k].get(f) != spec[k].get(f)]
        if diff:
            refuse(f"{run.ckpt_path} has another run spec ({'; '.join(diff)}); use a new --out-dir or --no-resume")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        optimizer.load_state_dict(ck["optimizer"])
        rngs = ck["rng"]
        set_rng_state(rngs[run.rank] if len(rngs) == run.world else rngs[0], run.device)
        run.print0(f"resumed from {run.ckpt_path} at step {ck['step']} (data position {ck['data']})")
        if run.master and os.path.exists(run.log_path):  # drop log lines of the lost steps
            keep = [ln for ln in open(run.log_path) if json.loads(ln)["step"] <= ck["step"]]
            open(run.log_path, "w").writelines(keep)
        return ck, ck["step"]
    if args.init_from:
        src = models.read_checkpoint(args.init_from, "--init-from")
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
        refuse(f"{run.ckpt_path} holds the shard-stream positions of {len(pos)} ranks; resume with "
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
            x0 = data.encode(nets.vae, x0, spec["latent"]["scale"])
        cond = conditioning.semantic_cond(sem, b.get("y") if sem["kind"] == "class" else b["caption"], nets.encoder,
                                          device, training=True, generator=g)
    if spec["model"].get("control"):
        cond["phi"] = b["phi"].to(device).float()
    return x0.float(), conditioning.drop_conditions(cond, args.p_drop_sem, args.p_drop_ctrl, null_sem, g)


def flops_per_image(run, spec, nets, sched):
    """Training FLOPs of one image, counted once by torch's FlopCounterMode on a synthetic batch (for MFU; GPU
    only: None where the device's peak is unknown)."""
    if models.device_peak(run.device)[1] is None:
        return None
    sem, device = spec["semantic"], run.device
    x0 = torch.randn(1, *data.latent_shape(spec["latent"], spec["data"]["resolution"]), device=device)
    cond = conditioning.semantic_cond(sem, [0] if sem["kind"] == "class" else ["a photo"], nets.encoder, device)
    cond.update(phi=conditioning.default_phi(spec, 1).to(device), keep_ctrl=torch.ones(1, device=device))
    with run.autocast:
        flops = models.count_flops(lambda: diffusion.loss_fn(nets.model, sched, x0, cond)[0])[1]
    nets.model.zero_grad(set_to_none=True)
    return flops


def checkpoint_state(args, run, spec, nets, step, data_pos, stream=False):
    """What a checkpoint holds: the unwrapped model, EMA, optimiser, step, run spec, args, every rank's RNG state
    (so a resumed rank continues its own stream) and the data position."""
    rngs = [rng_state(run.device)]
    if run.ddp:
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng_state(run.device))
        if stream:  # shard streams: every rank's own position
            ranks = [None] * run.world
            dist.all_gather_object(ranks, data_pos)
            data_pos = ranks
    return {"model": nets.model.state_dict(), "ema": nets.ema.state_dict(), "optimizer": nets.optimizer.state_dict(),
            "step": step, "spec": spec, "args": vars(args), "rng": rngs, "data": data_pos}


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
    imgs = models.generate(ema, spec, seeds=list(range(len(labels))), labels=labels, steps=args.sample_steps,
                           cfg=args.sample_cfg, device=run.device, precision=run.dtype)
    data.save_grid(imgs, os.path.join(args.out_dir, f"grid_{tag}.png"), nrow=cols)
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
    peak = models.device_peak(run.device)[1]
    rec = dict(step=step, loss=stats[0].item(), lr=lr, grad_norm=gnorm.item(), img_per_s=ips, mem_gb=mem,
               n_bad=meter.n_bad, n_noorig=meter.n_noorig, mfu=flops_img * ips / run.world / peak if flops_img else None, loss_by_t=bins)
    mfu = f" | mfu {100 * rec['mfu']:5.1f}%" if rec["mfu"] is not None else ""
    noorig = f" | no original size {meter.n_noorig}" if meter.n_noorig else ""  # size conditioning without signal
    run.print0(f"step {step:7d} | loss {rec['loss']:.4f} | lr {lr:.2e} | gnorm {rec['grad_norm']:7.3f} | "
               f"{ips:8.1f} img/s | mem {mem:6.2f} GB{mfu} | loss@t " + " ".join(f"{v:.3f}" for v in bins) + noorig)
    if run.master:
        with open(run.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")


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
            if step % args.ckpt_every == 0 or last:
                check_finite(meter, run, step)
                state = checkpoint_state(args, run, spec, nets, step, data_position(step), stream)
                if run.master:
                    models.save_checkpoint(state, run.ckpt_path)
                    run.print0(f"step {step}: checkpoint saved to {run.ckpt_path}")
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


def settings_table(args, run, spec, n_params):
    """The resolved settings, one per line, so that a user sees what will run (the full set is config.json)."""
    m, lat, sch = spec["model"], spec["latent"], spec["schedule"]
    rows = [("recipe", f"{args.recipe} ({'the CPU job' if args.size == 'tiny' else 'the paper run, §4 / Tab. A4'})"),
            ("model", f"{m['arch']}-{args.size}, {n_params / 1e6:.2f} M params"),
            ("data", f"{args.data} {args.data_path or ''} at {args.resolution} px, crop {args.crop}, "
                     f"flip {args.flip}"),
            ("latent", lat["vae"] or "pixels"),
            ("batch", f"{args.global_batch} = {run.world} rank(s) x micro-batch {run.micro} x accum {args.grad_accum}"),
            ("optim", f"lr {args.lr:g} (warm-up {args.warmup}), betas {tuple(args.adam_betas)}, wd "
                      f"{args.weight_decay:g}, clip {args.grad_clip:g}, EMA {args.ema_decay:g}"),
            ("steps", f"{args.max_steps}"),
            ("diffusion", f"{sch['objective']}, t ~ {sch['t_density']}, schedule scale {sch['scale']:g}"),
            ("control", f"{m.get('control') or 'none'}, gamma {m.get('gamma', '-')}"),
            ("system", f"{run.device}, {str(run.dtype).split('.')[-1]}, compile {args.compile}")]
    return "\n".join(f"  {k:<10} {v}" for k, v in rows)


def main(argv=None):
    args = parse_args(argv)
    if args.print_config:  # before any data, VAE, text encoder or model is loaded
        print(json.dumps({"spec": resolve_spec(args, None, explicit=explicit_flags(argv)), "args": vars(args)}))
        return
    run = setup(args)
    ds, vae, encoder = load_data(args, run)
    spec = resolve_spec(args, ds, vae, encoder, explicit_flags(argv))
    model, ema, optimizer = build(args, run, spec)
    ck, step = resume(args, run, spec, model, ema, optimizer)
    run.print0(settings_table(args, run, spec, sum(p.numel() for p in model.parameters())))
    if run.master:
        with data.atomic_write(os.path.join(args.out_dir, "config.json"), "w") as f:
            json.dump({"spec": spec, "args": vars(args)}, f, indent=2)
    train_loop(args, run, spec, ds, Nets(model, ema, optimizer, vae, encoder), ck, step)
    if run.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
