"""
Sample image grids from a checkpoint. The model is rebuilt from the checkpoint's run spec
(EMA weights by default); guidance is Eq. 2 with one batched model call per step.

    python sample.py --ckpt out/ckpt.pt                                   # every class (or a few prompts), one grid
    python sample.py --ckpt out/ckpt.pt --classes 0 3 --n-per 8 --cfg 2 --control-cfg 1.375 --orig-size 64 64
    python sample.py --ckpt cc12m.pt --prompts "a red square on the left" --seeds 100-107 --steps 50

Each image's noise comes from its own seed and files are named by seed, so an image does not depend on the
batch size or on which other images are drawn with it (EDM2). The model, its latent space, semantic condition and
schedule come from the checkpoint's run spec (run.load_checkpoint; generation is run.generate).
"""
import argparse
import os

import torch

import data
import diffusion
import formats
import run


def parse_seeds(s):
    """'0-15' -> [0..15]; '1,5,9' -> [1, 5, 9]."""
    if "-" in s:
        lo, hi = s.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(v) for v in s.split(",")]


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("io")
    g.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py (default: out/ckpt.pt)")
    g.add_argument("--out-dir", default=None, help="where PNGs go (default: <ckpt dir>/samples)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default: on)")
    g.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None, help="clamp predicted x0 to "
                   "[-1, 1] while sampling, or not (default: the run's --clip-x0)")
    g.add_argument("--save-images", action=argparse.BooleanOptionalAction, default=True,
                   help="also write one PNG per image, named by its seed: 000007.png (default: on)")
    g.add_argument("--npz", default=None, metavar="FILE.npz", help="also write the images as an ADM sample batch, "
                   "the file ADM's evaluator and evaluate.py --images read: arr_0 uint8 (N, H, W, 3) in ascending "
                   "seed order, quantised as the PNGs, and arr_1 int64 class labels for class-conditional checkpoints")
    g = p.add_argument_group("semantic condition")
    g.add_argument("--classes", nargs="*", default=None, help="class ids or embedded class names (default: first 10)")
    g.add_argument("--prompts", nargs="*", default=None, help="text prompts (text-mode checkpoints)")
    g.add_argument("--prompt-file", default=None, help="file with one prompt per line, or a COCO captions .json "
                   "(the first caption of each image, by image_id)")
    g.add_argument("--n-per", type=int, default=4, help="images per class / prompt (default: 4)")
    g.add_argument("--seeds", default=None, help="seed list '0-15' or '3,7'; one per image (default: 0..N-1)")
    g = p.add_argument_group("sampler and guidance")
    g.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="DDIM (eta 0) or DDPM; an rf "
                   "checkpoint samples with Euler, as 'ddim' (default: ddim)")
    g.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50; paper: 250 for FID)")
    g.add_argument("--cfg", type=float, default=4.0, help="semantic guidance lam of Eq. 2 (default: 4, DiT's "
                   "choice for sample grids; the paper's FID setting is 1.5 at 256 px)")
    g.add_argument("--control-cfg", type=float, default=None, help="control guidance beta of Eq. 2 (default: 1.375 "
                   "for a --recipe ours checkpoint at S/B/L/XL, Tab. A3; 1 = plain CFG otherwise)")
    g.add_argument("--schedule-scale", type=float, default=None, help="noise schedule scale (default: checkpoint's)")
    g = p.add_argument_group("control conditioning at inference")
    g.add_argument("--orig-size", type=int, nargs=2, default=None,
                   help="size condition H W in px (default: median original size of the training data)")
    g.add_argument("--crop-tl", type=int, nargs=2, default=(0, 0), help="crop condition top left in px (default: 0 0)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False, help="flip condition (default: off)")
    g = p.add_argument_group("diagnostic")
    g.add_argument("--denoise-from", type=int, default=None, metavar="T",
                   help="instead of sampling from noise, noise training crops to step T (0..999) and denoise them "
                   "(SDEdit); --seeds picks the dataset items (default 0-9), each keeps its class/caption and φ; "
                   "the grid shows the crops above their denoised versions")
    g = p.add_argument_group("system")
    g.add_argument("--batch-size", type=int, default=16, help="images per sampling batch (default: 16)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="autocast (default: "
                   "auto = bf16 on CUDA)")
    g.add_argument("--nrow", type=int, default=None, help="images per grid row (default: --n-per)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar of the "
                   "sampling steps of each batch on stderr (default: on)")
    return p


# ----------------------------------------------------------------------------- the grid
def denoise_training_crops(model, spec, args, out_dir, kw):
    """--denoise-from T: dataset items (the run's own data, crop and flip settings) noised to step T and denoised
    with their own class/caption and φ. Shows what the denoiser keeps and loses from a given noise level on."""
    d = spec["data"]
    if d["source"] in ("latents", "wds"):
        raise SystemExit(f"--denoise-from needs an indexable image dataset; this checkpoint's data is {d['source']}")
    ds = data.build_dataset(d["source"], d["path"], d["resolution"], d["crop"], d["flip"], d["seed"])
    idx = parse_seeds(args.seeds) if args.seeds else list(range(10))
    b = data.collate([ds[i] for i in idx])
    if b["n_bad"]:
        raise SystemExit(f"--denoise-from: {b['n_bad']} of the chosen dataset items are unreadable")
    labels = b["y"].tolist() if spec["semantic"]["kind"] == "class" else list(b["caption"])
    imgs = run.generate(model, spec, idx, labels, phi=b["phi"], images=b["image"], t_start=args.denoise_from,
                           **kw)
    grid = os.path.join(out_dir, f"denoise_from_{args.denoise_from}.png")
    data.save_grid(torch.cat([b["image"], imgs]), grid, nrow=len(idx))
    print(f"denoised {len(idx)} training crops from t = {args.denoise_from}: {grid} (top: crops, bottom: denoised)")


def grid_labels(spec, args):
    """The grid's labels, --n-per of each: class ids (--classes: ids or embedded class names; default the first 10)
    or prompts (--prompts, --prompt-file; default two embedded-style captions)."""
    if spec["semantic"]["kind"] == "class":
        names = list(data.CLASSES) if spec["data"]["source"] in data.EMBEDDED else []
        keys = args.classes if args.classes else list(range(min(spec["semantic"]["num_classes"], 10)))
        base = [names.index(c) if isinstance(c, str) and not c.isdigit() else int(c) for c in keys]
    else:
        base = list(args.prompts or [])
        if args.prompt_file:
            base += formats.read_prompts(args.prompt_file, "--prompt-file")[0]
        base = base or ["a red square on the left", "a blue circle on the right"]
    return [lab for lab in base for _ in range(args.n_per)]


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)

    if args.npz is not None and (not args.npz.endswith(".npz") or args.denoise_from is not None):
        p.error(f"--npz {args.npz}: expected a path ending in .npz, without --denoise-from")
    if args.denoise_from is not None:
        if not 0 <= args.denoise_from < diffusion.T:
            p.error(f"--denoise-from {args.denoise_from}: T must be in 0..{diffusion.T - 1}")
        try:
            diffusion.sampling_timesteps(args.steps, args.denoise_from)
        except ValueError as e:
            p.error(f"--denoise-from: {e}")
    device = run.get_device(args.device)
    model, ck = run.load_checkpoint(args.ckpt, device, ema=args.ema)
    spec, precision = ck["spec"], run.get_dtype(args.precision, device)
    if args.sampler == "ddpm" and spec["schedule"].get("objective") == "rf":
        p.error("--sampler ddpm: this checkpoint is rectified flow (--objective rf), sampled with Euler: use ddim")
    out_dir = args.out_dir or os.path.join(os.path.dirname(args.ckpt) or ".", "samples")
    os.makedirs(out_dir, exist_ok=True)
    if args.control_cfg is None:
        args.control_cfg, rule = run.default_beta(ck.get("args", {}))
        print(f"control guidance {rule} (--control-cfg overrides)")
    kw = dict(steps=args.steps, cfg=args.cfg, control_cfg=args.control_cfg, sampler=args.sampler, device=device,
              batch_size=args.batch_size, precision=precision, schedule_scale=args.schedule_scale,
              progress=args.progress, clip_x0=args.clip_x0)
    if args.denoise_from is not None:
        return denoise_training_crops(model, spec, args, out_dir, kw)
    labels = grid_labels(spec, args)  # row-major: one row per class / prompt
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(len(labels)))
    assert len(seeds) == len(labels), f"{len(seeds)} seeds for {len(labels)} images: give one seed per image"
    phi = run.default_phi(spec, len(labels), args.orig_size, args.crop_tl, args.flip)
    imgs = run.generate(model, spec, seeds, labels, phi=phi, **kw)
    if args.save_images:
        for s, img in zip(seeds, imgs):
            data.to_pil(img).save(os.path.join(out_dir, f"{s:06d}.png"))
    grid = os.path.join(out_dir, "grid.png")
    data.save_grid(imgs, grid, nrow=args.nrow or args.n_per)
    if args.npz:
        order = sorted(range(len(seeds)), key=seeds.__getitem__)  # ascending seed: as the PNG files sort
        formats.write_adm_batch(args.npz, imgs[order], [labels[i] for i in order] if spec["semantic"]["kind"] == "class"
                        else None)
    print(f"wrote {len(imgs)} images and {grid}" + (f" and {args.npz}" if args.npz else ""))


if __name__ == "__main__":
    main()
