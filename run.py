"""
The run: what a training run is (its presets and the run spec resolved from flags), what it writes and reads
(checkpoints), where it runs (device, DDP, autocast, FLOP counting) and how a trained model is sampled
(`generate`, with the run's defaults for the control φ, the control guidance β and the guidance λ).

train.py, sample.py, evaluate.py, transfer.py and bench.py all go through this file, so a checkpoint is read one
way and a model is rebuilt from its run spec alone (nanoGPT's GPT(GPTConfig(**model_args))). Imports point one way:
diffusion <- conditioning <- data, models <- run <- scripts.

    python -c "import run; print(run.resolve_settings({'recipe': 'ours', 'size': 'tiny', 'resolution': 16}, {})[1])"
"""
import contextlib
import glob
import json
import os
import random
import warnings

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch._subclasses.fake_tensor import FakeTensorMode
from safetensors.torch import save as safetensors_save
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import conditioning
import data
import latents
import diffusion
import models
from conditioning import PHI_KEYS

# ----------------------------------------------------------------------------- presets: one precedence
# A setting's value is the first of: the flag given on the command line > what the data says of itself (latent
# shards' resolution) > the recipe's row > the scale's (the paper's run at S/B/L/XL) > train.py's parser default
# (the tiny CPU job). resolve_settings applies the layers in that order and records which one set each value
# (train.py --print-config shows it).
#
# Recipe rows: one per system the paper trains (Tab. 1: its re-implementations and ours), each with that
# system's architecture (the Tab. A1 column it is, TAB_A1), conditioning and training paradigm (Tab. A4).
# A value that depends on the conditioning is written {"class": ..., "text": ...}. The baselines train without the
# paper's control conditioning (their own papers'; SDXL keeps its time ids), so their networks are the Tab. A1 cell
# less its 4.13 M control embedder (within 1 % of the paper's count; test_recipe_rows).
_BASELINE_OPT = dict(adam_betas=[0.9, 0.999], weight_decay=0.0)  # Tab. A4, SDXL / SD3 columns: (0.9, 0.999), no wd
_NO_CONTROL = dict(control=[], gamma="uniform", gamma_alpha=8.0, text_pad="zero", beta_txt=0.0)  # Tab. A4: zero pad
RECIPES = {
    # mmDiT-XL/2 (ours), Tab. 1 last row / Tab. A4 "mmDiT++": class or text only through attention, the class token
    # through the image stream's weights and the text tokens with their own q/k/v (Tab. A1's mmDiT-XL/2 column),
    # control (crop, size, flip) in adaLN with the cosine gamma_c (alpha 8, Tab. 2a / A6), noisy replicate text
    # padding (beta_txt 0.02, Tab. 3), resampled PE (§2.2), AdamW (0.9, 0.95), wd 0.03, DDPM-eps (Tab. A4).
    "ours": dict(arch="mmdit", class_in="attn", context_weights={"class": "shared", "text": "qkv"},
                 control=["crop", "size", "flip"], gamma="cosine", gamma_alpha=8.0, text_pad="noisy", beta_txt=0.02,
                 adam_betas=[0.9, 0.95], weight_decay=0.03, pe_grid="resample", objective="eps"),
    # mmDiT-XL/2 (SD3), Tab. 1: the same network without control, SD3's rectified flow with logit-normal t, zero
    # padding, interpolated (here extrapolated) PE (Tab. A4 middle column)
    "sd3": dict(arch="mmdit", class_in="attn", context_weights={"class": "shared", "text": "qkv"}, **_NO_CONTROL,
                **_BASELINE_OPT, pe_grid="extrapolate", objective="rf"),
    # UNet (SDXL), Tab. 1: SDXL's UNet with its own size/crop micro-conditioning (time ids at gamma_c = 1, Tab. A4
    # left column), cross-attention to the class tokens or the text, DDPM-eps; no flip conditioning
    "sdxl": dict(arch="unet", time_ids=True, **_NO_CONTROL, **_BASELINE_OPT, objective="eps"),
    # DiT-XL/2 w/ LN, Tab. 1: DiT with the class in adaLN (Peebles & Xie), DDPM-eps
    "dit": dict(arch="dit", class_in="adaln", **_NO_CONTROL, **_BASELINE_OPT, pe_grid="extrapolate", objective="eps"),
    # DiT-XL/2 w/ Att, Tab. 1 / Tab. A3 "+ mmDiT attention": the class token joins the attention with q/k/v of its
    # own (Tab. A1's Att-DiT-XL/2 column: 792 M against DiT's 679 M), q/k RMSNorm (§2)
    "dit-att": dict(arch="mmdit", class_in="attn", context_weights="qkv", **_NO_CONTROL, **_BASELINE_OPT,
                    pe_grid="extrapolate", objective="eps"),
    # mDT-v2-XL/2 w/ LN, Tab. 1: masked latent modelling (mask ratio 0.3, MDTv2), class in adaLN
    "mdt": dict(arch="mdt", **_NO_CONTROL, **_BASELINE_OPT, pe_grid="extrapolate", mask_ratio=0.3, objective="eps"),
    # PixArt-alpha-XL/2, Tab. 1: adaLN-single + cross-attention to the text (or the class tokens)
    "pixart": dict(arch="pixart", **_NO_CONTROL, **_BASELINE_OPT, pe_grid="extrapolate", objective="eps"),
}
# The tiny CPU job's deviations from "ours" (part of its row at --size tiny; --no-tiny-recipe drops them): SD3's
# rectified flow instead of DDPM-eps, the class embedding also in adaLN (a 64-wide model in a few thousand steps
# barely uses a class that enters through attention alone; RESULTS.md, the tiny default's study), and SD3's full
# context stream.
TINY_RECIPE = dict(objective="rf", class_in="adaln", context_weights="full")
# The scale layer: at S/B/L/XL every default is the paper's run (§4, Tab. A2, Tab. A4).
PAPER_SCALE = dict(
    resolution=256,  # §4: pre-training at 256 x 256 (512 is fine-tuned from it, transfer.py)
    vae=latents.DEFAULT_VAE,  # §3.1: latent diffusion on the SD VAE's latents (sd-vae-ft-ema)
    lr=1e-3,  # §4: "a constant learning rate of 10 x 10^-4" at batch 2048; Tab. A2: the largest that does not diverge
    max_steps=600_000,  # §4: 500k-1M iterations on ImageNet-1k (300k-500k on CC12M); 600k = Tab. 4a's IN1k run
    ema_decay=0.9999,  # deviation: the paper states no EMA; DiT's 0.9999
    warmup=1000,  # deviation: the paper's lr is constant from step 0; 1000 linear warm-up steps guard the first updates
    # how the full-size run is served (not the paper's words; what 8 GPUs need):
    num_workers=8,  # JPEG decode + crop for ~3,400 img/s over 8 ranks (batch 2048 at ~0.6 s a step) is ~425 img/s per
    #                 rank, a few workers' worth; 8 per rank leaves headroom and fits a 64-core node
    compile=True,  # torch.compile on CUDA (train.py keeps it off on the CPU unless --compile is given)
    ckpt_every=5000,  # an XL ckpt.pt is ~21 GB (20 B/param of weights, AdamW moments, EMA): at ~1-2 GB/s ~10-20 s
    #                   to write, ~0.5 % of the ~50 min that 5000 steps take on 8 H200 (~0.6 s a step), and a crash
    #                   loses at most those 50 min
    sample_every=5000,  # a grid with each checkpoint
)
PAPER_BATCH = {256: 2048, 512: 384}  # §4: global batch 2048 at 256 px (2 x 8 A100), 384 at 512 px (16 A100)
# Crops at 256 px: global [0.9, 1] for every row. Tab. 1's 256 px numbers are standalone 256 px models, and §3.4 /
# Fig. 8c find global crops best at 256 (local crops see no image whole); local crops [0.4, 0.6] (Tab. A4, ours)
# pay off only in the 512 px model fine-tuned from them (Fig. 8c, ~0.2 FID after 50k steps), so the pre-training
# command of the 256 -> 512 transfer asks for them (--crop local). Above 256 px (fine-tuning): whole images.
PAPER_CROP = "global"
LAYERS = ("tiny", "scale", "recipe", "data", "flag")  # lowest first


def scale_layer(size, recipe, resolution):
    """The paper's run at S/B/L/XL (nothing at tiny): PAPER_SCALE, the global batch of the resolution (§4) and
    global crops (PAPER_CROP)."""
    if size == "tiny":
        return {}
    crop = PAPER_CROP
    return dict(PAPER_SCALE, resolution=resolution, global_batch=PAPER_BATCH.get(resolution, PAPER_BATCH[256]),
                crop=crop)


def recipe_layer(recipe, size, tiny_recipe, semantic):
    """The recipe's row, its conditioning-dependent values taken for `semantic` (with the tiny job's deviations for
    ours at --size tiny)."""
    row = {k: v[semantic] if isinstance(v, dict) else v for k, v in RECIPES[recipe].items()}
    if recipe == "ours" and size == "tiny" and tiny_recipe:
        row.update(TINY_RECIPE)
    return row


def resolve_settings(defaults, flags, from_data=None):
    """(settings, set_by): every setting from the first layer that has it, highest first: flags (given on the
    command line) > what the data says of itself (from_data: the resolution in latent shards' meta.json) > recipe
    row > scale > defaults (the parser's own, the tiny CPU job). set_by[k] names the layer."""
    pick = {**defaults, **(from_data or {}), **flags}  # recipe, size and resolution choose the layers below
    res = pick["resolution"] if "resolution" in {**(from_data or {}), **flags} else (
        PAPER_SCALE["resolution"] if pick["size"] != "tiny" else defaults["resolution"])
    layers = dict(tiny=defaults, scale=scale_layer(pick["size"], pick["recipe"], res),
                  recipe=recipe_layer(pick["recipe"], pick["size"], pick.get("tiny_recipe", True), pick["semantic"]),
                  data=from_data or {}, flag=flags)
    settings, set_by = {}, {}
    for name in LAYERS:
        for k, v in layers[name].items():
            settings[k], set_by[k] = v, name
    return settings, set_by


# ----------------------------------------------------------------------------- the run spec
# One plain dict, resolved once right after parsing; it goes into config.json and every checkpoint, and
# sample.py / evaluate.py / transfer.py / resume rebuild from it, never from their own defaults:
#   model    build_model's arguments: arch, size and exactly the constructor keywords (models.build_model(**m))
#   latent   vae (None = pixels), scale, channels, down  (from the shards' meta.json for --data latents)
#   semantic class: num_classes, null_id | text: encoder, pretrained, pad, beta_txt, dim, pooled_dim
#   schedule make_schedule's arguments: scale (Eq. 3), objective, shift, t density, loss weight, zero-snr, clip
#   data     source, path, resolution, crop, flip, seed, orig_size (sample.py's default size condition)
MODEL_FLAGS = ("patch_size", "class_in", "pe_grid", "pe_base", "mask_ratio", "control", "gamma", "gamma_alpha",
               "gamma_step_sigma", "class_tokens", "context_weights", "time_ids")  # constructor keywords (where taken)
OPTIONAL_FLAGS = ("class_tokens", "context_weights", "time_ids")  # None: the arch's own default, not in the spec
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
            return latents.vae_latent(args.vae, vae)
        sd = args.vae == latents.DEFAULT_VAE  # --print-config: no VAE loaded; the SD VAE's constants are known
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


def data_flip(args):
    """The data's flip setting from --flip / --flip-p: True (p = data.FLIP_P), False, or another probability."""
    p = getattr(args, "flip_p", data.FLIP_P)  # specs of runs from before --flip-p existed flip at data.FLIP_P
    return bool(args.flip) and (True if p == data.FLIP_P else p)


def check_source(args, ds):
    """The data can feed the mode: some sample of the first 8 reads, and text mode has captions. One line naming the
    path otherwise; train.py calls it before the VAE and the text encoder load."""
    first = data.first_items(ds, 8)
    if not first:  # every sample unreadable: say so, not that the source lacks captions or labels
        refuse(f"--data-path {args.data_path}: no readable sample in the first 8 (--data {args.data} reads "
               f"{data.SOURCE_PATHS.get(args.data, 'embedded images')})")
    if args.semantic == "text" and ("caption" not in first[0] or all(s.get("missing_caption") for s in first)):
        refuse(f"--semantic text: --data {args.data} has no captions at {args.data_path} (the captions and wds "
               "sources read <key>.txt, latent shards their info.json's captions; imagefolder has none)")


def resolve_semantic(args, ds, encoder):
    """Class count and null id (the dataset's own count unless --num-classes), or the text encoder set-up."""
    if ds is not None:
        check_source(args, ds)
    if args.semantic == "text":
        return dict(kind="text", encoder=args.text_encoder, pretrained=args.text_encoder_path, pad=args.text_pad,
                    beta_txt=args.beta_txt, dim=encoder and encoder.dim, pooled_dim=encoder and encoder.pooled_dim)
    n = args.num_classes or getattr(ds, "num_classes", None)
    if not n and ds is not None:
        refuse(f"--semantic class: --data {args.data} has no class labels; pass --num-classes or --semantic text")
    return dict(kind="class", num_classes=n, null_id=n)  # null = the last row of the label table


def model_flag_kwargs(args, semantic, takes, cls, explicit):
    """The MODEL_FLAGS the arch takes. A flag it does not take (or a --class-in it has no mode for) is dropped when
    it comes from a default or the recipe, and refused in one line when given explicitly. Class flags do not apply
    in text mode, gamma flags not without control."""
    kw = {}
    for k in MODEL_FLAGS:
        v = getattr(args, k)
        text_mode_class_flag = k in ("class_in", "class_tokens") and semantic["kind"] == "text"
        if text_mode_class_flag or (k in OPTIONAL_FLAGS and v is None):
            continue  # the class embedding does not exist in text mode; None = the arch's own default
        if k.startswith("gamma") and not args.control:
            if k in explicit:
                refuse(f"{_flag(k)} needs control conditioning (--control crop size flip)")
            continue
        if k in takes and (k != "class_in" or v in cls.class_in_modes):
            kw[k] = list(v) if k == "control" else v
        elif k in explicit:
            modes = f" (it has {', '.join(cls.class_in_modes)})" if k == "class_in" and k in takes else ""
            refuse(f"{_flag(k)} {v} does not apply to --arch {args.arch}{modes}")
    return kw


def resolve_model(args, latent, semantic, explicit):
    """build_model's arguments: arch, size, input geometry, semantic widths and the model flags it takes."""
    arch, cls = args.arch, models.MODELS[args.arch]
    takes = models.arch_kwargs(arch)
    if semantic["kind"] == "text" and not cls.supports_text:
        refuse(f"--semantic text: --arch {arch} is class-conditional only (paper Tab. 1)")
    C, R, _ = data.latent_shape(latent, args.resolution) if latent["down"] else (None, None, None)
    kw = {k: v for k, v in dict(input_size=R, in_channels=C).items() if k in takes}
    kw.update(dict(num_classes=semantic["num_classes"]) if semantic["kind"] == "class" else
              dict(text_dim=semantic["dim"], pooled_dim=semantic["pooled_dim"]))
    kw.update(model_flag_kwargs(args, semantic, takes, cls, explicit))
    if kw.get("gamma") == "step" and "schedule_scale" in takes:  # its delta(sigma_t <= c) reads the Eq. 3 sigma
        kw["schedule_scale"] = args.schedule_scale
    if kw.get("time_ids"):  # SDXL's target size is in image pixels: the VAE's factor x the latent's size
        kw["time_id_down"] = latent["down"] or 1
    return dict(arch=arch, size=resolve_size(args, semantic["kind"]), **kw)


def resolve_size(args, kind="class"):
    """The --size preset's name, or its dict with --width / --depth put in (heads keep the preset's head width);
    the text UNet at a size of UNET_TEXT_SIZES is that layout (Tab. A1's text UNet-SDXL column)."""
    if args.arch == "unet" and kind == "text" and args.size in models.UNET_TEXT_SIZES:
        return dict(models.UNET_TEXT_SIZES[args.size])
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
    d = dict(source=args.data, path=args.data_path, resolution=args.resolution, crop=args.crop, flip=data_flip(args),
             seed=args.seed, orig_size=data.typical_orig_size(ds) if ds is not None else None,
             base_resolution=args.base_resolution)
    if args.data == "latents":  # the images the shards came from (evaluate.py --ref train)
        d["images"] = ds.meta.get("source") if ds is not None else None
    return dict(model=resolve_model(args, latent, semantic, explicit), latent=latent, semantic=semantic,
                schedule=diffusion.schedule_spec(vars(args)), data=d)


def spec_diff(old, new):
    """The SPEC_KEYS entries in which two run specs differ, as 'key.field: old -> new' strings."""
    return [f"{k}.{f}: {old[k].get(f)!r} -> {new[k].get(f)!r}" for k in SPEC_KEYS
            for f in sorted(set(old[k]) | set(new[k])) if old[k].get(f) != new[k].get(f)]


SPEC_FLAGS = {"input_size": "--resolution", "scale": "--schedule-scale", "size": "--size/--width/--depth",
              "vae": "--vae", "pad": "--text-pad", "pretrained": "--text-encoder-path", "encoder": "--text-encoder",
              "kind": "--semantic", "dim": "--text-encoder", "pooled_dim": "--text-encoder"}  # spec field -> flag


def init_conflicts(src_spec, spec):
    """'--flag (field: file's -> this run's)' for every model / latent / semantic / schedule field in which the
    run spec of an --init-from file and this run's differ (SPEC_FLAGS names the flag behind a field)."""
    return [f"{SPEC_FLAGS.get(f, _flag(f))} ({k}.{f}: {src_spec[k].get(f)!r} in the file, {spec[k].get(f)!r} here)"
            for k in SPEC_KEYS for f in sorted(set(src_spec[k]) | set(spec[k]))
            if src_spec[k].get(f) != spec[k].get(f) and not (k == "latent" and spec[k].get(f) is None)]


# ----------------------------------------------------------------------------- Tab. A1 models
# The XL models whose parameters and FLOPs (batch 1, 2 x multiply-adds) Tab. A1 lists, as build_model arguments;
# measured cell by cell in RESULTS.md ("Tab. A1, cell by cell"). D = 1152, 28 blocks, 256 / 1024 image tokens at
# 256 / 512 px, 77 CLIP-L tokens of width 768, 1000 classes. A DiT-XL block costs 2 x 12 D^2 = 31.85 MFLOPs a token.
# Size conditioning is counted in every model: the control embedder (crop, size, flip: 4.13 M) in the transformers,
# SDXL's time ids in the UNets.
#  DiT-XL/2     DiT + control: 674.82 + 4.13 = 678.95 M (paper 679.09).  mdT-XL/2: 745.34 M (748.07).
#  PixArt-XL/2  adaLN-single + 28 cross-attentions (4 D^2 each) + control: 610.08 M class (611.7), 611.14 text (610.12).
#  mmDiT-XL/2   class: the class token through the image stream's own weights (context_weights "shared"): DiT's
#               678.95 M. text: the 77 tokens own their q/k/v ("qkv"): 27 x (3 D^2 + 3 D) + (2 D^2 + 2 D) (last
#               block: k, v) = 110.25 M, + text embedders 3.10 - label table 1.15 = 791.15 M (791.64).
#  Att-DiT-XL/2 DiT + "mmDiT attention" (Tab. A3): the class token owns its q/k/v: 674.82 + 110.25 + 4.13 = 789.20 M
#               (792.44) at the one-token FLOPs; text: the text mmDiT's blocks.
#  UNet-SDXL    class: the XL preset + time ids = 402.73 M (401.75). text: SD 1.x's layout ("similar size to the
#               original LDM", §2): widths (320, 640, 1280, 1280), attention at the three finest levels and the mid
#               block, + SDXL's text_time embedding = 864.11 M (864.31).
# No reading consistent with the other cells meets the text FLOPs of PixArt (its 1,140 G at 512 px is below the class
# model's 1,200), mmDiT (77 tokens add 74.6 G at 256 px whatever weights they own), Att-DiT (all three cells), and
# the text UNet at 256 px: RESULTS.md gives the arithmetic.
TAB_A1_CONTROL = ("crop", "size", "flip")  # the paper's control signals (Eq. 1, §3.3)
TAB_A1_CLASSES, TAB_A1_TEXT_DIM = 1000, 768  # ImageNet-1k; CLIP ViT-L/14 token and pooled width (§3.1)
TAB_A1 = {  # (column, cond) -> build_model arguments besides input size, channels and classes / text widths
    ("UNet-SDXL", "class"): dict(arch="unet", size="XL", time_ids=True),
    ("UNet-SDXL", "text"): dict(arch="unet", size=models.UNET_TEXT_SIZES["XL"], time_ids=True),
    ("PixArt-XL/2", "class"): dict(arch="pixart", size="XL", control=TAB_A1_CONTROL),
    ("PixArt-XL/2", "text"): dict(arch="pixart", size="XL", control=TAB_A1_CONTROL),
    ("mmDiT-XL/2", "class"): dict(arch="mmdit", size="XL", class_in="attn", context_weights="shared",
                                  control=TAB_A1_CONTROL),
    ("mmDiT-XL/2", "text"): dict(arch="mmdit", size="XL", context_weights="qkv", control=TAB_A1_CONTROL),
    ("Att-DiT-XL/2", "class"): dict(arch="mmdit", size="XL", class_in="attn", context_weights="qkv",
                                    control=TAB_A1_CONTROL),
    ("Att-DiT-XL/2", "text"): dict(arch="mmdit", size="XL", context_weights="qkv", control=TAB_A1_CONTROL),
    ("mdT-XL/2", "class"): dict(arch="mdt", size="XL", control=TAB_A1_CONTROL),
    ("DiT-XL/2", "class"): dict(arch="dit", size="XL", control=TAB_A1_CONTROL),
}


def tab_a1_spec(column, cond, resolution=256, size="XL"):
    """models.build_model's arguments for a column of paper Tab. A1 ("DiT-XL/2", ..., cond "class" or "text") on SD VAE
    latents of a resolution-px image: the paper's model at size XL, the same configuration at another SIZES preset
    (the text UNet then takes models.UNET_SIZES[size]). Unknown cells are a one-line error listing the known ones."""
    if (column, cond) not in TAB_A1:
        raise SystemExit(f"Tab. A1 has no cell ({column!r}, {cond!r}); it has {sorted(TAB_A1)}")
    kw = dict(TAB_A1[(column, cond)])
    if size != "XL":
        kw["size"] = size
    if kw["arch"] != "unet":  # the UNet is fully convolutional
        kw["input_size"] = resolution // data.VAE_DOWN
    elif kw.get("time_ids"):  # SDXL's target size in image pixels: 8 x the latent's
        kw["time_id_down"] = data.VAE_DOWN
    kw.update(dict(num_classes=TAB_A1_CLASSES) if cond == "class" else
              dict(text_dim=TAB_A1_TEXT_DIM, pooled_dim=TAB_A1_TEXT_DIM))
    return dict(kw, in_channels=data.LATENT_CH, control=list(kw.get("control", ())))


def tab_a1_model(column, cond, resolution=256, size="XL"):
    """The model of a Tab. A1 cell (tab_a1_spec); build it under torch.device("meta") to count it for free."""
    return models.build_model(**tab_a1_spec(column, cond, resolution, size))


# ----------------------------------------------------------------------------- checkpoints (the one loader)
def read_checkpoint(path, flag="--ckpt"):
    """The checkpoint dict of train.py / transfer.py (ckpt.pt, ckpt_<step>.pt), or of ema.safetensors as
    {"ema", "spec", "args", "step"}; a missing file is a one-line error naming `flag`."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path!r} not found: pass {flag} PATH (train.py writes <out-dir>/ckpt.pt and "
                         f"<out-dir>/{EMA_FILE})")
    if path.endswith(".safetensors"):
        return read_safetensors(path, flag)
    return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(path, device="cpu", ema=True, flag="--ckpt"):
    """(model in eval mode on device, checkpoint dict): the model is rebuilt from the checkpoint's run spec
    (ck["spec"]["model"] = build_model's arguments), EMA weights unless ema=False."""
    ck = read_checkpoint(path, flag)
    if not ema and "model" not in ck:
        raise SystemExit(f"{path}: holds the EMA weights only; drop --no-ema or pass the run's ckpt.pt")
    model = models.build_model(**ck["spec"]["model"])
    model.load_state_dict(ck["ema" if ema else "model"])
    return model.to(device).eval(), ck


def save_checkpoint(obj, path):
    """torch.save, atomically (data.atomic_write): a crash at any point leaves the old file intact."""
    with data.atomic_write(path) as f:
        torch.save(obj, f)


# The weights to share: the EMA as safetensors (no pickle; loads in any framework), the run spec, args and step in
# the file's string metadata as JSON, so sample.py / evaluate.py rebuild the model from this one file.
EMA_FILE = "ema.safetensors"
SAFETENSORS_KEYS = ("spec", "args", "step")


def save_safetensors(state, spec, args, step, path):
    """EMA state dict + run spec to `path` as safetensors, atomically (data.atomic_write)."""
    meta = {"spec": json.dumps(spec), "args": json.dumps(args), "step": json.dumps(step)}
    blob = safetensors_save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=meta)
    with data.atomic_write(path) as f:
        f.write(blob)


def read_safetensors(path, flag="--ckpt"):
    """{"ema": state dict, "spec", "args", "step"} of a file save_safetensors wrote; a safetensors file without
    the run spec (another tool's) is a one-line error naming `flag`."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if any(k not in meta for k in SAFETENSORS_KEYS):
            raise SystemExit(f"{path}: a safetensors file without the run spec in its metadata; pass {flag} with a "
                             f"train.py {EMA_FILE} or ckpt.pt")
        state = {k: f.get_tensor(k) for k in f.keys()}
    return {"ema": state, **{k: json.loads(meta[k]) for k in SAFETENSORS_KEYS}}


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


def gather_ranks(obj, ddp, world):
    """[obj of every rank] under DDP, [obj] in one process."""
    if not ddp:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- device, precision, FLOPs
# Dense bf16 tensor-core peaks, FLOP/s (datasheets quote 2x these "with sparsity"). Sources: NVIDIA H100 datasheet
# (SXM 989 TF, PCIe 756 TF, NVL 835 TF), NVIDIA H200 datasheet (989 TF, same GH100 compute as H100 SXM),
# NVIDIA A100 datasheet (312 TF, SXM and PCIe). First key whose words all appear in the device name wins.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
# CPU flash attention is not in FlopCounterMode's registry (torch 2.14): count it like the CUDA kernels
# (arguments arrive as shapes: q, k, v[, ...] forward; grad_out, q, k, v[, ...] backward)
FLOP_MAP = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(g, q, k, v)}


def get_device(name="auto"):
    """--device: auto = cuda when available, else cpu; when a GPU is present but CUDA cannot be used (a driver
    older than this torch's CUDA, a CPU-only build), one line says why before the run goes on on the CPU."""
    if name != "auto":
        return torch.device(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    if ok:
        return torch.device("cuda")
    present = glob.glob("/dev/nvidia[0-9]*")
    if caught or present:
        why = str(caught[0].message).strip().splitlines()[0] if caught else (
            "this torch build has no CUDA" if not torch.backends.cuda.is_built() else "no usable CUDA device")
        print(f"--device auto: CUDA not used ({why}); running on the CPU", flush=True)
    return torch.device("cpu")


def init_distributed(name="auto"):
    """DDP the nanoGPT way: torchrun sets RANK; one process runs the same code path with rank 0 of 1.
    Returns (ddp, rank, world, device): NCCL and this rank's GPU on CUDA, gloo on the CPU."""
    device = get_device(name)
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, device
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}")
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def get_dtype(precision, device):
    """--precision: auto = bf16 autocast on CUDA, fp32 elsewhere (CPUs without native bf16 crawl under it)."""
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else torch.float32


def autocast(device, dtype):
    """The one autocast context: dtype autocast over fp32 master weights, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def device_peak(device):
    """(device name, dense bf16 peak FLOP/s, or None when unknown / CPU)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_BF16.items() if all(w in name for w in k.split())), None)


def count_flops(fn):
    """(forward FLOPs, forward+backward FLOPs) of fn() -> loss, as counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_MAP) as fc:
        loss = fn()
        fwd = fc.get_total_flops()
        loss.backward()
    return fwd, fc.get_total_flops()


# ----------------------------------------------------------------------------- memory plan (--grad-accum auto)
# Per card: fixed memory + micro-batch x activation memory per image.
#   fixed = fp32 weights, grads (views of DDP's all-reduce buckets: train.py sets gradient_as_bucket_view), AdamW's
#           two moments and the EMA copy: BYTES_PER_PARAM per trainable parameter, plus autocast's bf16 weight
#           copies (measured) and the frozen encoders (fp32);
#   activations = the bytes autograd saves for backward, measured on fake tensors (shapes and dtypes, no compute)
#           under bf16 autocast at two batch sizes: the slope is per image, the intercept autocast's weight copies.
# A card keeps PLAN_RESERVE GiB for the CUDA context, NCCL and the allocator's fragmentation; the plan fills
# PLAN_FILL of the rest. bench.py --suite memory tabulates it for the paper's runs; its calibration against a
# measured H200 step is in RESULTS.md ("Memory plan").
PLAN_RESERVE, PLAN_FILL = 2.0, 0.9
BYTES_PER_PARAM = 20  # fp32: weights 4 + grads 4 (the DDP buckets) + AdamW moments 8 + EMA 4
CLIP_L_TEXT_PARAMS = 123.65e6  # open_clip ViT-L-14 text tower (token embedding, 12 layers of 768, projection)
SD_VAE_PARAMS = 83.65e6  # sd-vae-ft-ema AutoencoderKL (encoder + decoder, both kept by train.py)


def takes_phi(m):
    """Whether the model reads the crop/size/flip parameters phi: as control conditioning, or as SDXL's time ids."""
    return bool(m.get("control") or m.get("time_ids"))


def synthetic_batch(spec, B):
    """(x0, cond) of B random images shaped as the run spec's model sees them (latents or pixels, class ids or
    text features, φ of an uncropped flipped original), for counting FLOPs and memory."""
    g = torch.Generator().manual_seed(0)
    m, R = spec["model"], spec["data"]["resolution"]
    x0 = torch.randn(B, *data.latent_shape(spec["latent"], R), generator=g)
    if m.get("text_dim"):
        cond = {"text": torch.randn(B, 77, m["text_dim"], generator=g)}
        if m.get("pooled_dim"):
            cond["pooled"] = torch.randn(B, m["pooled_dim"], generator=g)
    else:
        cond = {"y": torch.randint(0, m["num_classes"], (B,), generator=g)}
    if takes_phi(m):
        cond.update(phi=default_phi(spec, B, flip=True), keep_ctrl=torch.ones(B))
    return x0, cond


def saved_bytes(spec, B, fake=True):
    """(bytes autograd saves for backward in one bf16-autocast training forward of B images, parameters excluded;
    parameter count). fake: on fake tensors (nothing is computed or allocated, so an XL model costs seconds on a
    CPU); fake=False runs the same forward for real, which is how the tests check the fake count."""
    with FakeTensorMode() if fake else contextlib.nullcontext():
        torch.manual_seed(0)
        model = models.build_model(**spec["model"])
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        x0, cond = synthetic_batch(spec, B)
        saved = {}

        def pack(t):
            s = t.untyped_storage()
            if s._cdata not in params:
                saved[s._cdata] = (s.nbytes(), t)  # keep t: an id is unique only while its storage lives
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), torch.bfloat16):
            diffusion.loss_fn(model, diffusion.Schedule(), x0, cond)
        n_params = sum(p.numel() for p in model.parameters())
    return sum(b for b, _ in saved.values()), n_params


def memory_per_card(spec, frozen_params):
    """dict(params, fixed_gib, act_gib per image, bf16_gib) of a run spec's training step on one card, with
    frozen_params parameters of frozen fp32 encoders (VAE, text tower) beside it."""
    (b1, P), (b3, _) = saved_bytes(spec, 1), saved_bytes(spec, 3)
    act = (b3 - b1) / 2
    fixed = BYTES_PER_PARAM * P + (b1 - act) + 4 * frozen_params
    return dict(params=P, fixed_gib=fixed / 2**30, act_gib=act / 2**30, bf16_gib=(b1 - act) / 2**30)


def plan_micro_batch(m, per_card, card_gib):
    """(micro-batch, --grad-accum, planned GiB) for one card: the largest divisor of the per-card batch whose memory
    fits PLAN_FILL of the card less PLAN_RESERVE; None when not even one image fits."""
    room = PLAN_FILL * (card_gib - PLAN_RESERVE) - m["fixed_gib"]
    fits = [b for b in range(1, per_card + 1) if per_card % b == 0 and b * m["act_gib"] <= room]
    if not fits:
        return None
    micro = max(fits)
    return micro, per_card // micro, m["fixed_gib"] + micro * m["act_gib"]


# ----------------------------------------------------------------------------- the run's φ, β and λ at sampling
EVAL_LAM = 1.5  # App. C: guidance lam 1.5 at the pre-training resolution (Eq. 4 -> 2.0 at 2x)
PAPER_BETA = 1.375  # Tab. A3 / Fig. 7 right: the control guidance beta the paper's model is evaluated at


def default_phi(spec, n, orig_size=None, crop_tl=(0, 0), flip=False):
    """φ (n, 5) for inference: crop (top, left), flip and original size (h, w) in pixels (default: the typical
    original size of the training data recorded in the spec, else the resolution)."""
    d = spec["data"]
    h, w = orig_size or d.get("orig_size") or (d["resolution"], d["resolution"])
    vals = dict(crop_top=crop_tl[0], crop_left=crop_tl[1], flip=flip, orig_h=h, orig_w=w)
    return torch.tensor([float(vals[k]) for k in PHI_KEYS]).repeat(n, 1)


def default_beta(run_args):
    """Control guidance beta of Eq. 2 for a checkpoint, by one rule: PAPER_BETA for a --recipe ours run at
    S/B/L/XL (the paper's model), 1 (plain CFG) otherwise, tiny CPU runs included. run_args: the checkpoint's
    "args". Returns (beta, the rule's words, for the log)."""
    if run_args.get("recipe") == "ours" and run_args.get("size", "tiny") != "tiny":
        return PAPER_BETA, f"beta {PAPER_BETA:g}: a --recipe ours checkpoint at --size {run_args['size']} (Tab. A3)"
    return 1.0, "beta 1 (plain CFG): not a full-size --recipe ours checkpoint"


def default_lam(spec):
    """Eq. 4 from lam = 1.5 at the pre-training resolution: s = resolution / base_resolution, the pre-training
    resolution that transfer.py records for every arch (train.py --base-resolution); without it s = patch grid /
    pe_base (a run given only --pe-base); s = 1 without either (no transfer)."""
    d, m = spec["data"], spec["model"]
    if d.get("base_resolution"):
        return diffusion.guidance_law(EVAL_LAM, d["resolution"] / d["base_resolution"])
    if not m.get("pe_base"):
        return EVAL_LAM
    return diffusion.guidance_law(EVAL_LAM, m["input_size"] // m.get("patch_size", 2) / m["pe_base"])


# ----------------------------------------------------------------------------- generation (as nanoGPT GPT.generate)
@torch.no_grad()
def generate(model, spec, seeds, labels, phi=None, steps=50, cfg=1.5, control_cfg=1.0, sampler="ddim", device="cpu",
             batch_size=16, precision=torch.float32, schedule_scale=None, progress=False, images=None, t_start=None,
             clip_x0=None):
    """Images (N, 3, H, W) in [-1, 1] on the CPU, one per (seed, label), from a model and its run spec.
    labels: class ids or prompts; phi: (N, 5) control (default: default_phi); cfg = lam, control_cfg = beta of
    Eq. 2 (beta = 1: plain CFG). Sample i starts from noise drawn from torch.Generator().manual_seed(seeds[i]) on
    the CPU (device independent, EDM2); the DDPM sampler's extra noise uses per-sample generators too (rf: Euler,
    sampler "ddim" only); the model output is read as the run's objective (eps / v / x0 / rf). With images
    (N, 3, H, W) in [-1, 1], sample i starts instead from images[i] noised to the first step <= t_start (SDEdit).
    clip_x0: True / False overrides the run's x0 clamping while sampling (None: the run spec's)."""
    device = torch.device(device)
    t_start = diffusion.T - 1 if t_start is None else t_start
    model.eval()
    sem, lat, control = spec["semantic"], spec["latent"], spec["model"].get("control")
    enc = conditioning.semantic_encoder(sem, device)
    vae = latents.get_vae(lat["vae"], str(device)) if lat["vae"] else None
    null_sem = conditioning.semantic_null(sem, enc, device)
    sched = diffusion.schedule_from_args(spec["schedule"], device, scale=schedule_scale, clip_x0=clip_x0)
    phi = default_phi(spec, len(seeds)) if phi is None else phi
    t0 = sched.timesteps(steps, t_start)[0].item()  # first step (pure noise unless SDEdit)
    shape = data.latent_shape(lat, spec["data"]["resolution"])  # (C, H, W) the model sees
    out = []
    for i in range(0, len(seeds), batch_size):
        sl = slice(i, i + batch_size)
        noise = torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds[sl]])
        cond = conditioning.semantic_cond(sem, labels[sl], enc, device)
        if takes_phi(spec["model"]):
            cond["phi"] = phi[sl].to(device).float()
            cond["keep_ctrl"] = torch.ones(len(noise), device=device)
        cond, cond_s, cond_null = conditioning.guidance_conds(cond, null_sem)
        if not control:  # without control, Eq. 2 reduces to CFG: the control-dropped branch equals cond
            cond_s = cond
        fn = diffusion.guided_eps_fn(model, cond, cond_s, cond_null, cfg, control_cfg)

        def eps_fn(x, t):
            with autocast(device, precision):
                return fn(x, t).float()

        x = noise.to(device)
        if images is not None:  # SDEdit: data noised to the first sampling step
            z = images[sl].to(device) if vae is None else latents.encode(vae, images[sl].to(device), lat["scale"])
            x = sched.q_sample(z.float(), torch.full((len(z),), t0, device=device), x)
        if sampler == "ddim":
            x = diffusion.ddim_sample(eps_fn, x, sched, steps, progress=progress, t_start=t_start)
        else:
            gens = [torch.Generator(device).manual_seed(s + (1 << 32)) for s in seeds[sl]]
            x = diffusion.ddpm_sample(eps_fn, x, sched, steps, generator=gens, progress=progress, t_start=t_start)
        if vae is not None:
            x = latents.decode(vae, x, lat["scale"])
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)
