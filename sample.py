"""
Sample image grids from a checkpoint (SPEC §7). The model is rebuilt from the checkpoint's own args
(EMA weights by default); guidance is Eq. 2 with one batched model call per step.

    python sample.py --ckpt out/ckpt.pt                                   # every class (or a few prompts), one grid
    python sample.py --ckpt out/ckpt.pt --classes 0 3 --n-per 8 --cfg 2 --control-cfg 1.375 --orig-size 64 64
    python sample.py --ckpt cc12m.pt --prompts "a red square on the left" --seeds 100-107 --steps 50

Each image's noise comes from its own seed and files are named by seed, so an image does not depend on the
batch size or on which other images are drawn with it (EDM2). Other scripts import `load_checkpoint_model`
and `generate` from here: the one place a model is rebuilt from a checkpoint.
"""
import argparse
import os

import torch

import conditioning
import data
import diffusion
import models
from data import LATENT_CH, VAE_DOWN  # SD VAE: 4 latent channels, 8x down (named once, in data.py)

_CACHE = {}  # text encoders / VAEs by (kind, name, device): loaded once per process


# ----------------------------------------------------------------------------- rebuilding from a checkpoint
def build_model_from_args(a, text_encoder=None):
    """The denoiser described by train.py's args dict `a` (fresh weights). Text mode needs the token / pooled
    widths: taken from `a` (stored by train.py) or from the text encoder."""
    kind = {"num_classes": a["num_classes"]} if a["semantic"] == "class" else {
        "text_dim": a.get("text_dim") or text_encoder.dim, "pooled_dim": a.get("pooled_dim") or text_encoder.pooled_dim}
    latent = a["vae"] != "none" or a["data"] == "latents"
    return models.build_model(
        a["arch"], a["size"], input_size=a["resolution"] // (VAE_DOWN if latent else 1),
        in_channels=LATENT_CH if latent else 3, class_in=a["class_in"], control=tuple(a["control"]),
        gamma=a["gamma"], gamma_alpha=a["gamma_alpha"], gamma_step_sigma=a["gamma_step_sigma"], pe_grid=a["pe_grid"],
        pe_base=a["pe_base"], mask_ratio=a["mask_ratio"], patch_size=a["patch_size"], **kind)


def read_checkpoint(path, flag="--ckpt"):
    """The checkpoint dict of train.py / transfer.py; a missing file is a one-line error, not a traceback."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path!r} not found: pass {flag} PATH (train.py writes <out-dir>/ckpt.pt)")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint_model(path, device="cpu", ema=True):
    """(model in eval mode on device, the checkpoint's train.py args as a dict). ema=False loads the raw weights."""
    ck = read_checkpoint(path)
    a = ck["args"]
    model = build_model_from_args(a)
    model.load_state_dict(ck["ema" if ema else "model"])
    return model.to(device).eval(), a


def get_text_encoder(a, device):
    """The frozen text encoder of a text-mode run (cached)."""
    key = ("text", a["text_encoder"], a["text_encoder_path"], str(device))
    if key not in _CACHE:
        _CACHE[key] = conditioning.TextEncoder(a["text_encoder"], a["text_encoder_path"],
                                                 flag="--text-encoder-path").to(device)
    return _CACHE[key]


def get_vae(a, device):
    """The frozen VAE of a latent-space run (cached), or None in pixel space."""
    if a["vae"] == "none":
        return None
    key = ("vae", a["vae"], str(device))
    if key not in _CACHE:
        _CACHE[key] = data.load_vae(a["vae"]).to(device).eval().requires_grad_(False)
    return _CACHE[key]


def null_semantic(a, text_encoder, device):
    """Null class id / empty-prompt features of this run (what semantic dropout and guidance substitute)."""
    if a["semantic"] == "class":
        return conditioning.null_semantic(num_classes=a["num_classes"], device=device)
    return conditioning.null_semantic(text_encoder=text_encoder, padding=a["text_pad"], device=device)


def semantic_cond(a, y=None, captions=None, text_encoder=None, device="cpu", training=False, generator=None):
    """Class ids or captions -> the semantic part of `cond` (text: frozen features + padding, outside the model)."""
    if a["semantic"] == "class":
        return {"y": torch.as_tensor(y, dtype=torch.long).to(device)}
    return conditioning.encode_text(text_encoder, list(captions), a["text_pad"], a["beta_txt"], training, generator)


def default_phi(a, n, orig_size=None, crop_tl=(0, 0), flip=False):
    """φ (n, 5) for inference: crop (top, left), flip and original size (h, w) in pixels (default: the median
    original size of the training data, stored by train.py, else the resolution)."""
    h, w = orig_size or a.get("orig_size") or (a["resolution"], a["resolution"])
    return torch.tensor([float(crop_tl[0]), float(crop_tl[1]), float(flip), float(h), float(w)]).repeat(n, 1)


def default_labels(a, ds=None):
    """(labels, columns) of the periodic training grid: every class (up to 10) x 4 seeds, or 4 captions x 4."""
    if a["semantic"] == "class":
        k = min(a["num_classes"], 10)
        return [c for _ in range(4) for c in range(k)], k
    caps = [ds[i]["caption"] for i in range(4)] if ds is not None else ["a photo"] * 4
    return [c for _ in range(4) for c in caps], 4


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model, a, seeds, labels, phi=None, steps=50, cfg=1.5, control_cfg=1.0, sampler="ddim", device="cpu",
             vae=None, text_encoder=None, batch_size=16, precision=torch.float32, schedule_scale=None, progress=False,
             images=None, t_start=diffusion.T - 1):
    """Images (N, 3, H, W) in [-1, 1] on the CPU, one per (seed, label). labels: class ids or prompts;
    phi: (N, 5) control (default: default_phi); cfg = lam, control_cfg = beta of Eq. 2 (beta = 1: plain CFG).
    Sample i starts from noise drawn from torch.Generator().manual_seed(seeds[i]) on the CPU (device
    independent); the DDPM sampler's extra noise uses per-sample generators too. With images (N, 3, H, W) in
    [-1, 1], sample i starts instead from images[i] noised with that noise to the first step <= t_start (SDEdit)."""
    device = torch.device(device)
    model.eval()
    if a["semantic"] == "text" and text_encoder is None:
        text_encoder = get_text_encoder(a, device)
    if vae is None:
        vae = get_vae(a, device)
    null_sem = null_semantic(a, text_encoder, device)
    sched = diffusion.Schedule(a["schedule_scale"] if schedule_scale is None else schedule_scale).to(device)
    phi = default_phi(a, len(seeds)) if phi is None else phi
    t0 = diffusion.sampling_timesteps(steps, t_start)[0].item()  # first step (T-1 unless SDEdit)
    C = LATENT_CH if (a["vae"] != "none" or a["data"] == "latents") else 3
    R = a["resolution"] // (VAE_DOWN if C != 3 else 1)
    autocast = torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32)
    out = []
    for i in range(0, len(seeds), batch_size):
        sl = slice(i, i + batch_size)
        noise = torch.stack([torch.randn(C, R, R, generator=torch.Generator().manual_seed(s)) for s in seeds[sl]])
        lab = labels[sl]
        cond = semantic_cond(a, None if a["semantic"] == "text" else lab, lab, text_encoder, device)
        if a["control"]:
            cond["phi"] = phi[sl].to(device).float()
            cond["keep_ctrl"] = torch.ones(len(lab), device=device)
        cond, cond_s, cond_null = conditioning.guidance_conds(cond, null_sem)
        if not a["control"]:  # without control, Eq. 2 reduces to CFG: the control-dropped branch equals cond
            cond_s = cond

        def eps_fn(x, t, fn=diffusion.guided_eps_fn(model, cond, cond_s, cond_null, cfg, control_cfg)):
            with autocast:
                return fn(x, t).float()

        x = noise.to(device)
        if images is not None:  # SDEdit: data noised to the first sampling step
            z = images[sl].to(device) if vae is None else data.encode(vae, images[sl].to(device))
            x = sched.q_sample(z.float(), torch.full((len(z),), t0, device=device), x)
        if sampler == "ddim":
            x = diffusion.ddim_sample(eps_fn, x, sched, steps, progress=progress, t_start=t_start)
        else:
            gens = [torch.Generator(device).manual_seed(s + (1 << 32)) for s in seeds[sl]]
            x = diffusion.ddpm_sample(eps_fn, x, sched, steps, generator=gens, progress=progress, t_start=t_start)
        if vae is not None:
            x = data.decode(vae, x)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def to_pil(img):
    """(3, H, W) in [-1, 1] -> PIL image."""
    from PIL import Image
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def save_grid(images, path, nrow=8, pad=2):
    """Tile (N, 3, H, W) images in [-1, 1] into one PNG, nrow images per row."""
    from PIL import Image
    N, _, H, W = images.shape
    rows = (N + nrow - 1) // nrow
    grid = Image.new("RGB", (nrow * (W + pad) + pad, rows * (H + pad) + pad), "white")
    for i, img in enumerate(images):
        grid.paste(to_pil(img), (pad + (i % nrow) * (W + pad), pad + (i // nrow) * (H + pad)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


def parse_seeds(s):
    """'0-15' -> [0..15]; '1,5,9' -> [1, 5, 9]."""
    if "-" in s:
        lo, hi = s.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(v) for v in s.split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # io
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py (default: out/ckpt.pt)")
    p.add_argument("--out-dir", default=None, help="where PNGs go (default: <ckpt dir>/samples)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default: on)")
    p.add_argument("--save-images", action=argparse.BooleanOptionalAction, default=True,
                   help="also write one <seed>.png per image (default: on)")
    # semantic condition
    p.add_argument("--classes", nargs="*", default=None, help="class ids or embedded class names (default: first 10)")
    p.add_argument("--prompts", nargs="*", default=None, help="text prompts (text-mode checkpoints)")
    p.add_argument("--prompt-file", default=None, help="file with one prompt per line")
    p.add_argument("--n-per", type=int, default=4, help="images per class / prompt (default: 4)")
    p.add_argument("--seeds", default=None, help="seed list '0-15' or '3,7'; one per image (default: 0..N-1)")
    # sampler and guidance
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="DDIM (eta 0) or DDPM (default: ddim)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50; paper: 250 for FID)")
    p.add_argument("--cfg", type=float, default=4.0, help="semantic guidance lam of Eq. 2 (default: 4, DiT's "
                   "choice for sample grids; the paper's FID setting is 1.5 at 256 px)")
    p.add_argument("--control-cfg", type=float, default=1.0, help="control guidance beta of Eq. 2; 1 = plain CFG "
                   "(default: 1; paper's best 1.375)")
    p.add_argument("--schedule-scale", type=float, default=None, help="noise schedule scale (default: checkpoint's)")
    # control conditioning at inference
    p.add_argument("--orig-size", type=int, nargs=2, default=None,
                   help="size condition H W in px (default: median original size of the training data)")
    p.add_argument("--crop-tl", type=int, nargs=2, default=(0, 0), help="crop condition top left in px (default: 0 0)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False, help="flip condition (default: off)")
    # diagnostic
    p.add_argument("--denoise-from", type=int, default=None, metavar="T",
                   help="instead of sampling from noise, noise training crops to step T (0..999) and denoise them "
                   "(SDEdit); --seeds picks the dataset items (default 0-9), each keeps its class/caption and φ; "
                   "the grid shows the crops above their denoised versions")
    # system
    p.add_argument("--batch-size", type=int, default=16, help="images per sampling batch (default: 16)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="autocast (default: "
                   "auto = bf16 on CUDA)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: --n-per)")
    args = p.parse_args(argv)

    if args.denoise_from is not None:
        if not 0 <= args.denoise_from < diffusion.T:
            p.error(f"--denoise-from {args.denoise_from}: T must be in 0..{diffusion.T - 1}")
        try:
            diffusion.sampling_timesteps(args.steps, args.denoise_from)
        except ValueError as e:
            p.error(f"--denoise-from: {e}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model, a = load_checkpoint_model(args.ckpt, device, ema=args.ema)
    precision = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
        else torch.float32
    out_dir = args.out_dir or os.path.join(os.path.dirname(args.ckpt) or ".", "samples")
    os.makedirs(out_dir, exist_ok=True)
    kw = dict(steps=args.steps, cfg=args.cfg, control_cfg=args.control_cfg, sampler=args.sampler, device=device,
              batch_size=args.batch_size, precision=precision, schedule_scale=args.schedule_scale, progress=True)
    if args.denoise_from is not None:
        return denoise_training_crops(model, a, args, out_dir, kw)
    if a["semantic"] == "class":
        names = list(getattr(data, "CLASSES", []))
        keys = args.classes if args.classes else list(range(min(a["num_classes"], 10)))
        base = [names.index(c) if isinstance(c, str) and not c.isdigit() else int(c) for c in keys]
    else:
        base = list(args.prompts or [])
        if args.prompt_file:
            base += [line.strip() for line in open(args.prompt_file) if line.strip()]
        base = base or ["a red square on the left", "a blue circle on the right"]
    labels = [lab for lab in base for _ in range(args.n_per)]  # row-major: one row per class / prompt
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(len(labels)))
    assert len(seeds) == len(labels), f"{len(seeds)} seeds for {len(labels)} images: give one seed per image"
    phi = default_phi(a, len(labels), args.orig_size, args.crop_tl, args.flip)
    imgs = generate(model, a, seeds, labels, phi=phi, **kw)
    if args.save_images:
        for s, img in zip(seeds, imgs):
            to_pil(img).save(os.path.join(out_dir, f"{s:06d}.png"))
    grid = os.path.join(out_dir, "grid.png")
    save_grid(imgs, grid, nrow=args.nrow or args.n_per)
    print(f"wrote {len(imgs)} images and {grid}")


def denoise_training_crops(model, a, args, out_dir, kw):
    """--denoise-from T: dataset items (the run's own data, crop and flip settings) noised to step T and denoised
    with their own class/caption and φ. Shows what the denoiser keeps and loses from a given noise level on."""
    if a["data"] in ("latents", "wds"):
        raise SystemExit(f"--denoise-from needs an indexable image dataset; this checkpoint's --data is {a['data']}")
    ds = data.build_dataset(a["data"], a.get("data_path"), a["resolution"], a["crop"], a["flip"], a["seed"])
    idx = parse_seeds(args.seeds) if args.seeds else list(range(10))
    b = data.collate([ds[i] for i in idx])
    if b["n_bad"]:
        raise SystemExit(f"--denoise-from: {b['n_bad']} of the chosen dataset items are unreadable")
    labels = b["y"].tolist() if a["semantic"] == "class" else list(b["caption"])
    imgs = generate(model, a, idx, labels, phi=b["phi"], images=b["image"], t_start=args.denoise_from, **kw)
    grid = os.path.join(out_dir, f"denoise_from_{args.denoise_from}.png")
    save_grid(torch.cat([b["image"], imgs]), grid, nrow=len(idx))
    print(f"denoised {len(idx)} training crops from t = {args.denoise_from}: {grid} (top: crops, bottom: denoised)")


if __name__ == "__main__":
    main()
