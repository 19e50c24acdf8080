"""
Latent space: the VAE (load, encode, decode) and latent pre-extraction to shards that `--data latents` reads
(paper §2.2: K augmented crops per image, each with its φ).

    python latents.py --source imagefolder --path /data/imagenet/train --resolution 256 --k 4 \
        --vae stabilityai/sd-vae-ft-ema --device cuda --out /data/in256_latents
    python latents.py --preview assets/embedded_examples.png      # look at the embedded dataset (data.preview)

Library file (and the extraction CLI): imports data.py (the datasets, the shard format LatentDataset reads,
atomic writes), which knows nothing of the VAE; run.py, evaluate.py, sample.py, bench.py and transfer.py import it.
"""
import argparse
import glob
import functools
import json
import os

import numpy as np
import torch
from tqdm import tqdm
from conditioning import ORIG_H, ORIG_W, PHI_KEYS
from data import (CROPS, LATENT_CH, SHARD_INFO, SOURCES, VAE_DOWN, VAE_SCALE, _open_shard, atomic_write, build_dataset,
                  collate, latent_shape, preview)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # DiT's VAE (its sample.py default)
# The SD VAE's architecture: stabilityai/sd-vae-ft-ema's config.json (diffusers AutoencoderKL), 83.65 M params.
# "sd-random" builds it with seeded random weights: the real sizes and costs without the download.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                     layers_per_block=2, latent_channels=LATENT_CH, norm_num_groups=32, act_fn="silu",
                     sample_size=256, scaling_factor=VAE_SCALE)
TINY_VAE_CONFIG = dict(SD_VAE_CONFIG, block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=32)
RANDOM_VAES = {"tiny": TINY_VAE_CONFIG, "sd-random": SD_VAE_CONFIG}  # --vae names built with seeded random weights


# ----------------------------------------------------------------------------- VAE
def load_vae(name=DEFAULT_VAE, device="cpu", flag="--vae"):
    """diffusers AutoencoderKL from the hub or a local folder; None / "none" -> pixel space; RANDOM_VAES names ->
    seeded random weights ("tiny": 1 M params, tests and CPU runs; "sd-random": the SD VAE's architecture, the scale
    harness). Missing weights offline -> one-line SystemExit naming the flag."""
    if name is None or name == "none":
        return None
    from diffusers import AutoencoderKL
    if name in RANDOM_VAES:
        with torch.random.fork_rng(devices=[]):  # seeded, so train / sample / every rank build the same VAE
            torch.manual_seed(0)
            vae = AutoencoderKL.from_config(RANDOM_VAES[name])
    else:
        import warnings
        try:
            with warnings.catch_warnings():  # hub deprecation chatter
                warnings.simplefilter("ignore")
                vae = AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=False)  # no `accelerate` needed
        except (OSError, ValueError) as e:  # offline / missing: one line, no traceback
            raise SystemExit(f"VAE weights '{name}' unavailable ({type(e).__name__}); pass {flag} PATH to a diffusers "
                             f"AutoencoderKL folder, or {flag} none for pixel space") from None
    return vae.eval().requires_grad_(False).to(device)


@functools.lru_cache(maxsize=4)
def get_vae(name, device="cpu"):
    """load_vae, once per (name, device) and process: sampling and evaluation share one frozen copy."""
    return load_vae(name, device)


def vae_latent(name, vae):
    """The run spec's "latent" section of a VAE: name, scale (its config's scaling_factor, 0.18215 for the SD
    VAEs), latent channels and the spatial downsampling (2 per extra encoder level)."""
    cfg = vae.config
    return dict(vae=name, scale=float(getattr(cfg, "scaling_factor", VAE_SCALE)), channels=int(cfg.latent_channels),
                down=2 ** (len(cfg.block_out_channels) - 1))


@torch.no_grad()
def encode(vae, images, scale=VAE_SCALE, generator=None):
    """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) * scale; posterior mean unless a generator asks to sample."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    z = dist.sample(generator) if generator is not None else dist.mean
    return z.float() * scale


@torch.no_grad()
def decode(vae, latents, scale=VAE_SCALE):
    """(B, 4, h, w) scaled latents -> (B, 3, 8h, 8w) images in [-1, 1]."""
    return vae.decode(latents.to(vae.device, vae.dtype) / scale).sample.float().clamp(-1, 1)


# ----------------------------------------------------------------------------- pre-extraction
def _write_latent_shard(out, n, arrays, info):
    """Write shard_NNNNN.tmp/ (each file fsync'd), then rename it to shard_NNNNN/: a killed run never leaves a shard
    folder that looks complete; a rerun deletes the stale .tmp and writes the shard again."""
    final = os.path.join(out, f"shard_{n:05d}")
    import shutil
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for c, v in arrays.items():
        with open(os.path.join(tmp, f"{c}.npy"), "wb") as f:
            np.save(f, v)
            f.flush()
            os.fsync(f.fileno())
    with open(os.path.join(tmp, SHARD_INFO), "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _latent_units(ds, k, shard_size):
    """Output shard n -> its inputs, fixed by the inputs alone (so any rank can write any shard, and a rerun
    writes the same one): map-style, rows g = j * len(ds) + i of the k passes in blocks of shard_size, as
    [(pass j, first i, end i), ...]; webdataset, one shard per (pass j, tar s), n = j * n_tars + s."""
    if isinstance(ds, torch.utils.data.IterableDataset):
        S = len(ds.shards)
        return [[(j, s)] for j in range(k) for s in range(S)]
    N, units = len(ds), []
    for g0 in range(0, k * N, shard_size):
        g1, segs = min(g0 + shard_size, k * N), []
        for j in range(g0 // N, (g1 - 1) // N + 1):
            segs.append((j, max(g0 - j * N, 0), min(g1 - j * N, N)))
        units.append(segs)
    return units


def _unit_batches(ds, segs, batch_size, num_workers):
    """The collated batches of one output shard's inputs, pass by pass."""
    import copy
    for seg in segs:
        if isinstance(ds, torch.utils.data.IterableDataset):
            j, s = seg
            sub = copy.copy(ds)
            sub.set_epoch(j)
            sub.select = [s]  # this tar, whole, split over workers only
        else:
            j, a, b = seg
            ds.set_epoch(j)  # pass j = augmentation epoch j (workers copy the dataset with it)
            sub = torch.utils.data.Subset(ds, range(a, b))
        yield from torch.utils.data.DataLoader(sub, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)


def extract_latents(ds, vae, out, k=1, batch_size=64, shard_size=4096, dtype=torch.float16, device="cpu",
                    num_workers=0, vae_name="", source=None, rank=None, world=None, progress=True):
    """Encode k augmented passes (epochs 0..k-1) over ds into out/shard_NNNNN/ (.npy arrays, memory-mapped by
    LatentDataset) with φ, crop size, key, y/caption. meta.json records the VAE (what train.py's run spec takes its
    "latent" section from) and `source`, the build_dataset arguments of the images (evaluate.py --ref train computes
    FID against them).

    Resumable: a shard is renamed into place only once complete, and a rerun skips the finished ones (refusing,
    in one line, shards written with other settings). Shardable: rank r of world w (RANK / WORLD_SIZE, as torchrun
    sets them) writes shards r::w; whichever rank finds every shard finished writes meta.json (the same content
    from any rank). `progress`: a tqdm bar (images, rate, ETA) on stderr from rank 0, over the images this rank
    encodes (webdataset: counted, no total). Returns meta, or {"complete": False, ...} from a rank that finished
    before the others."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    os.makedirs(out, exist_ok=True)
    if glob.glob(os.path.join(out, "shard_*.pt")):
        raise SystemExit(f"{out}: holds old-format shard_*.pt latents; extract into a new --out")
    latent = vae_latent(vae_name, vae)
    np_dtype = str(torch.empty(0, dtype=dtype).numpy().dtype)
    iterable = isinstance(ds, torch.utils.data.IterableDataset)
    plan = json.loads(json.dumps(dict(  # what a shard's content depends on: a rerun must match it
        **latent, k=k, shard_size=None if iterable else shard_size, dtype=np_dtype, resolution=ds.resolution,
        crop=ds.crop, flip=ds.flip, seed=ds.seed, inputs=len(ds.shards) if iterable else len(ds), source=source)))
    units = _latent_units(ds, k, shard_size)
    ch, h, w = latent_shape(latent, ds.resolution)
    todo = [n for n in range(rank, len(units), world) if not os.path.isdir(os.path.join(out, f"shard_{n:05d}"))]
    total = None if iterable else sum(b - a for n in todo for _, a, b in units[n])
    bar = tqdm(total=total, desc=f"latents -> {out}", unit="img", disable=not progress or rank != 0,
               dynamic_ncols=True)
    for n in range(rank, len(units), world):
        d = os.path.join(out, f"shard_{n:05d}")
        if os.path.isdir(d):  # finished by an earlier run
            info = _open_shard(d)[1]
            if info.get("plan") != plan:
                diff = sorted(c for c in plan if plan[c] != (info.get("plan") or {}).get(c))
                raise SystemExit(f"{d}: written with other settings ({', '.join(diff)} differ); extract into a new "
                                 f"--out or delete the folder's shards")
            continue
        cols, info = {}, dict(rows=0, keys=[], n_bad=0, n_noorig=0, plan=plan)
        for b in _unit_batches(ds, units[n], batch_size, num_workers):
            info["n_bad"] += b["n_bad"]
            info["n_noorig"] += b.get("n_noorig", 0)
            bar.update(b["n_bad"] + len(b.get("key", ())))
            if "image" not in b:
                continue
            z = encode(vae, b["image"].to(device), latent["scale"]).to(dtype).cpu()  # (B, 4, R/8, R/8)
            for c, v in (("latent", z), ("phi", b["phi"].float()), ("crop_size", b["crop_size"]), ("y", b.get("y"))):
                if v is not None:
                    cols.setdefault(c, []).append(v.numpy())
            info["keys"] += b["key"]
            if "caption" in b:
                info.setdefault("captions", []).extend(b["caption"])
            info["rows"] += len(z)
        arrays = {c: np.concatenate(v) for c, v in cols.items()}
        if not info["rows"]:  # every input unreadable: an empty shard, still finished
            arrays = dict(latent=np.zeros((0, ch, h, w), np_dtype), phi=np.zeros((0, len(PHI_KEYS)), np.float32),
                          crop_size=np.zeros(0, np.int64))
        _write_latent_shard(out, n, arrays, info)
    bar.close()
    done = [os.path.join(out, f"shard_{n:05d}") for n in range(len(units))]
    if not all(os.path.isdir(d) for d in done):
        return dict(complete=False, shards=len(units), finished=sum(os.path.isdir(d) for d in done))
    infos = [_open_shard(d)[1] for d in done]
    n_bad = sum(i["n_bad"] for i in infos)
    meta = dict(**latent, k=k, rows=sum(i["rows"] for i in infos), num_classes=ds.num_classes,
                bad_per_pass=n_bad // max(k, 1),
                no_orig_size_per_pass=sum(i.get("n_noorig", 0) for i in infos) // max(k, 1),
                resolution=ds.resolution, crop=ds.crop, source=source, format="npy", shards=len(units), dtype=np_dtype)
    tmp = os.path.join(out, f"meta.json.{os.getpid()}.tmp")  # per-process tmp: two last ranks may both write
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out, "meta.json"))
    return meta


def synthetic_latents(out, n=4096, resolution=256, num_classes=1000, shard_size=4096, seed=0, vae_name=DEFAULT_VAE):
    """A latents folder of random N(0, 1) latents in the format extract_latents writes (meta.json + shards, fp16,
    memory-mapped): uncropped, unflipped R x R originals and random classes. For timing the full-size model without
    a dataset or a VAE (bench.py --suite gpu-train); the numbers it learns are meaningless."""
    rng = np.random.default_rng(seed)
    h = resolution // VAE_DOWN
    phi = np.zeros((n, len(PHI_KEYS)), np.float32)
    phi[:, [ORIG_H, ORIG_W]] = resolution
    for s, a in enumerate(range(0, n, shard_size)):
        b = min(a + shard_size, n)
        arrays = dict(latent=rng.standard_normal((b - a, LATENT_CH, h, h), np.float32).astype(np.float16),
                      phi=phi[a:b], crop_size=np.full(b - a, resolution, np.int64),
                      y=rng.integers(0, num_classes, b - a, dtype=np.int64))
        _write_latent_shard(out, s, arrays, dict(rows=b - a, keys=[f"synthetic_{i:08d}" for i in range(a, b)]))
    meta = dict(vae=vae_name, scale=VAE_SCALE, channels=LATENT_CH, down=VAE_DOWN, k=1, rows=n,
                num_classes=num_classes, resolution=resolution, crop="center", source=None, format="npy",
                shards=-(-n // shard_size), dtype="float16")
    with atomic_write(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Pre-extract VAE latents (K augmented crops per image, with φ) or preview "
                                            "the embedded dataset.")
    # data
    p.add_argument("--source", default="embedded", choices=SOURCES[:-1], help="dataset to encode (default embedded)")
    p.add_argument("--path", default=None, help="dataset root / shard pattern (not needed for embedded)")
    p.add_argument("--length", type=int, default=10_000, help="number of embedded images")
    p.add_argument("--resolution", type=int, default=256, help="crop side in pixels after resize")
    p.add_argument("--crop", default="global", choices=CROPS, help="crop strategy (§2.2)")
    p.add_argument("--flip", default=True, action=argparse.BooleanOptionalAction, help="random horizontal flip p=0.5")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed")
    # vae
    p.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL (hub id or folder), or "
                   f"{' / '.join(RANDOM_VAES)} (seeded random weights)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored latent dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="encoding device")
    # io
    p.add_argument("--out", default=None, help="output folder for shard_NNNNN/ (.npy) + meta.json; a rerun "
                   "resumes (finished shards are skipped); under torchrun rank r writes shards r::w")
    p.add_argument("--k", type=int, default=1, help="augmented crops stored per image")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call")
    p.add_argument("--shard-size", type=int, default=4096, help="input samples per shard (wds: one per tar, pass)")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers for decoding")
    p.add_argument("--preview", default=None, help="write a PNG grid of embedded examples here and exit")
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction,
                   help="progress bar with ETA on stderr (rank 0; --no-progress for logs)")
    args = p.parse_args()
    if args.preview:
        preview(args.preview, seed=args.seed)
    else:
        if not args.out:
            p.error("--out FOLDER is required for extraction (or --preview FILE)")
        if args.device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        ds = build_dataset(args.source, args.path, args.resolution, args.crop, args.flip, args.seed, args.length)
        src = dict(source=args.source, path=args.path, seed=args.seed, length=args.length)
        meta = extract_latents(ds, load_vae(args.vae, args.device), args.out, args.k, args.batch_size,
                               args.shard_size, getattr(torch, args.dtype), args.device, args.num_workers, args.vae, src,
                               progress=args.progress)
        print(json.dumps(meta))
