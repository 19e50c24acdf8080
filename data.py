"""
Data: datasets with control metadata φ, crop strategies, latent shards as a source (paper §2.2, §3.3).

Every dataset yields dicts
    {"image": (3, R, R) float in [-1, 1]  (or "latent": (4, R/8, R/8) from latent shards),
     "y": int (class sources) and/or "caption": str (text sources),
     "phi": (5,) float = PHI_KEYS (crop_top, crop_left, flip, orig_h, orig_w) in original-image pixels,
     "crop_size": int side of the square crop in original pixels (not seen by the model; makes φ reproducible),
     "key": str (stable sample id)}
and None for a sample that cannot be decoded; `collate` drops the Nones and counts them (batch["n_bad"]), so
bad files never stop a run and the count reaches the training log even from DataLoader workers.

Sources (build_dataset(source, ...)):
    embedded     procedural shapes, needs no files (default); class ids AND captions with colour + left/right
    embedded-web the same shapes with web-like sizes: 4-64 px originals, small ones soft and filled by the object
    imagefolder  root/<class>/<img>  (ImageNet layout)                         map-style
    captions     folder of images with <name>.txt caption sidecars             map-style
    wds          webdataset tar shards (img2dataset: key.jpg|png + key.txt)  iterable (see WdsDataset)
    latents      shards written by `python latents.py --out DIR ...`           map-style
Map-style datasets are exactly resumable: sample i of epoch e depends only on (seed, e, i); call set_epoch(e).

The VAE and latent pre-extraction live in latents.py (which imports this file).
"""
import contextlib
import glob
import io
import itertools
import json
import math
import os
import tarfile

import numpy as np
import torch
from PIL import Image, ImageDraw

from conditioning import ORIG_H, ORIG_W, PHI_KEYS

# ----------------------------------------------------------------------------- constants (defined once)
VAE_SCALE = 0.18215  # SD / LDM latent scale factor (diffusers AutoencoderKL config "scaling_factor")
VAE_DOWN, LATENT_CH = 8, 4  # SD VAE (latents.DEFAULT_VAE): 8x spatial downsampling, 4 latent channels
EMBEDDED = ("embedded", "embedded-web")  # the procedural sources (no files)
SOURCES = (*EMBEDDED, "imagefolder", "captions", "wds", "latents")
SOURCE_PATHS = {"imagefolder": "a root/<class>/<image> folder", "captions": "a folder of images with .txt captions",
                "wds": "tar shards: a folder, a glob or dir/{00000..00099}.tar",
                "latents": "a folder written by python latents.py --out"}  # what --data-path is, per source
CROP_RANGES = {"global": (0.9, 1.0), "local": (0.4, 0.6), "mix": (0.4, 1.0)}  # §2.2, Fig. 8c: side = u * min(H, W)
CROPS = (*CROP_RANGES, "center")  # center: the centred min(H, W) square (evaluation's view; training may use it)
FLIP_P = 0.5
IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# embedded dataset: 10 shapes x 8 colours, left/right placement, varied original sizes (§3.3: flip matters)
CLASSES = ("circle", "square", "triangle", "diamond", "ring", "cross", "star", "hexagon", "moon", "bar")
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
          "magenta": (210, 50, 200), "cyan": (40, 200, 210), "orange": (240, 140, 30), "white": (240, 240, 240)}


PIXELS = dict(vae=None, scale=1.0, channels=3, down=1)  # the run spec's "latent" section of a pixel-space run
RESOLUTION = 16  # train.py's default --resolution (CPU, pixels): chosen by the tiny-default study in RESULTS.md
SIDES = ("left", "right")  # the embedded captions' placement words
HELDOUT_START = 1_000_000  # held-out items of the embedded dataset: indices never drawn in training (< length)
# embedded-web: originals whose size shows in the pixels a 16 px model sees, as on the web (§2.2: size conditioning
# acts on what size changes). Short side 4..64 px, drawn WEB_SUPERSAMPLE x larger and box-filtered down, so a small
# original upsampled to the resolution is soft and a large one sharp; the object's radius falls from WEB_RADIUS[0]
# of the short side at the smallest size to WEB_RADIUS[1] at the largest (log-linear): composition follows size.
WEB_SIDES, WEB_RADIUS, WEB_SUPERSAMPLE = (4, 64), (0.38, 0.14), 4


# ----------------------------------------------------------------------------- small shared helpers
@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open <path>.tmp for writing, fsync, then os.replace onto path: a crash at any point leaves the old file."""
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def to_uint8(x):
    """[-1, 1] float (..., 3, H, W) -> uint8, quantised exactly as a PNG of it stores it."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(img):
    """(3, H, W) in [-1, 1] -> PIL image."""
    return Image.fromarray(to_uint8(img).permute(1, 2, 0).numpy())


def save_grid(images, path, nrow=8, pad=2):
    """Tile (N, 3, H, W) images in [-1, 1] into one PNG, nrow images per row."""
    N, _, H, W = images.shape
    rows = (N + nrow - 1) // nrow
    grid = Image.new("RGB", (nrow * (W + pad) + pad, rows * (H + pad) + pad), "white")
    for i, img in enumerate(images):
        grid.paste(to_pil(img), (pad + (i % nrow) * (W + pad), pad + (i // nrow) * (H + pad)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


PLOT_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#7f7f7f")


def plot_lines(series, path, title="", w=520, h=320, pad=44):
    """Line plot drawn with PIL (no matplotlib): series = {name: (xs, ys)}; NaN points are skipped; a legend
    with each series' colour; the axes' end values written at the corners."""
    pts = {k: [(x, y) for x, y in zip(*v) if y == y] for k, v in series.items()}  # y == y drops NaN
    allp = [p for v in pts.values() for p in v]
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    d.text((pad, 8), title, fill="black")
    if allp:
        x0, x1 = min(p[0] for p in allp), max(p[0] for p in allp)
        y0, y1 = min(p[1] for p in allp), max(p[1] for p in allp)
        sx = lambda x: pad + (x - x0) / ((x1 - x0) or 1) * (w - 2 * pad)
        sy = lambda y: h - pad - (y - y0) / ((y1 - y0) or 1) * (h - 2 * pad)
        for k, (name, p) in enumerate(pts.items()):
            col = PLOT_COLORS[k % len(PLOT_COLORS)]
            if len(p) > 1:
                d.line([(sx(x), sy(y)) for x, y in p], fill=col, width=2)
            for x, y in p:
                d.ellipse([sx(x) - 2, sy(y) - 2, sx(x) + 2, sy(y) + 2], fill=col)
            d.text((w - pad - 150, pad + 4 + 12 * k), name, fill=col)
        d.text((pad, h - pad + 6), f"{x0:g}", fill="black")
        d.text((w - pad - 30, h - pad + 6), f"{x1:g}", fill="black")
        d.text((2, pad - 12), f"{y1:.3g}", fill="black")
        d.text((2, h - pad), f"{y0:.3g}", fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)


def latent_shape(latent, resolution):
    """(C, H, W) the denoiser sees for an image of `resolution` px: pixels, or VAE latents (run spec "latent")."""
    r = resolution // latent["down"]
    return latent["channels"], r, r


def first_items(ds, n):
    """Up to n decodable samples: evenly spread over a map-style dataset (not just its first class), the first n
    of an iterable one's stream."""
    if isinstance(ds, torch.utils.data.IterableDataset):
        return list(itertools.islice((s for s in ds if s is not None), n))
    idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int)
    return [s for s in (ds[int(i)] for i in sorted(set(idx))) if s is not None]


def typical_orig_size(ds, n=64):
    """Median original (h, w) of n samples spread over the data: sample.py's default size condition."""
    items = first_items(ds, n)
    return torch.stack([s["phi"][[ORIG_H, ORIG_W]] for s in items]).median(0).values.tolist() if items else None


# ----------------------------------------------------------------------------- crops and φ
def sample_crop(h, w, crop, rng):
    """Square crop (top, left, side) in original pixels: side = u*min(h, w), u ~ U[lo, hi], uniform position."""
    if crop == "center":
        side = min(h, w)
        return (h - side) // 2, (w - side) // 2, side
    lo, hi = CROP_RANGES[crop]
    side = max(1, int(round(rng.uniform(lo, hi) * min(h, w))))
    return int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side


def crop_image(img, top, left, side, flip, resolution):
    """PIL image -> (3, R, R) float in [-1, 1]: crop, resize (bicubic, antialiased), then flip."""
    img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, R, R)
    return x.flip(-1) if flip else x


def load_image(path_or_file):
    """Decode fully (so truncated files fail here, not later) and convert to RGB; raises on bad data."""
    with Image.open(path_or_file) as im:
        im.load()
        return im.convert("RGB")


class _Augmented:
    """Shared augmentation: crop strategy + random flip (flip: True = p FLIP_P, False, or a probability p),
    randomness from (seed, epoch, index) only."""

    def __init__(self, resolution=32, crop="global", flip=True, seed=0):
        assert crop in CROPS, f"crop must be one of {CROPS}"
        self.resolution, self.crop, self.flip, self.seed, self.epoch = resolution, crop, flip, seed, 0
        self.n_bad = 0  # bad samples seen by THIS process (workers report theirs through collate's n_bad)
        self.num_classes = None  # class sources set it; None = captions only

    def set_epoch(self, epoch):
        self.epoch = epoch

    def augment(self, img, index, **extra):
        rng = np.random.default_rng([self.seed, self.epoch, *index])  # deterministic given (seed, epoch, index)
        w, h = img.size
        top, left, side = sample_crop(h, w, self.crop, rng)
        p = FLIP_P if self.flip is True else float(self.flip or 0)  # flip: True (FLIP_P), False or a probability
        flip = bool(p > 0 and rng.random() < p)  # evaluation sets build with flip=False
        vals = dict(crop_top=top, crop_left=left, flip=float(flip), orig_h=h, orig_w=w)
        phi = torch.tensor([vals[k] for k in PHI_KEYS], dtype=torch.float32)  # (5,) original-image pixels
        return {"image": crop_image(img, top, left, side, flip, self.resolution), "phi": phi, "crop_size": side,
                **extra}


# ----------------------------------------------------------------------------- embedded procedural dataset
def _shape_polygon(name, cx, cy, r):
    """Vertices of the polygonal classes, centred at (cx, cy) with radius r."""
    def ring(n, rad, phase=0.0):
        return [(cx + rad[i % len(rad)] * math.cos(phase + 2 * math.pi * i / n),
                 cy + rad[i % len(rad)] * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]
    if name == "triangle":
        return ring(3, [r], -math.pi / 2)
    if name == "diamond":
        return ring(4, [r], -math.pi / 2)
    if name == "star":
        return ring(10, [r, 0.45 * r], -math.pi / 2)
    if name == "hexagon":
        return ring(6, [r])
    a = 0.3 * r  # cross: 12-gon
    return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a), (cx + a, cy + a),
            (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a)]


def web_radius(side):
    """embedded-web: the object's radius as a fraction of the short side, log-linear in the original's short side."""
    (s0, s1), (r0, r1) = WEB_SIDES, WEB_RADIUS
    return r0 + (r1 - r0) * math.log(side / s0) / math.log(s1 / s0)


def render_embedded(seed, i, web=False):
    """Image i of the embedded dataset (embedded-web when `web`): (PIL image, class id, caption). Deterministic in
    (seed, i, web)."""
    rng = np.random.default_rng([seed, i, 7])
    y = i % len(CLASSES)
    cname, (colname, rgb) = CLASSES[y], list(COLORS.items())[int(rng.integers(len(COLORS)))]
    side = int(rng.integers(*WEB_SIDES, endpoint=True) if web else rng.integers(48, 161))  # short side, px
    long = int(side * rng.uniform(1.0, 2.0))  # aspect ratio 1:2 .. 2:1
    out_hw = (side, long) if rng.random() < 0.5 else (long, side)
    ss = WEB_SUPERSAMPLE if web else 1  # drawn at ss x the original's size, then box-filtered down to it
    h, w = out_hw[0] * ss, out_hw[1] * ss
    # dark two-tone vertical gradient background
    c0, c1 = rng.integers(0, 70, 3), rng.integers(0, 70, 3)
    ramp = np.linspace(0, 1, h)[:, None, None]
    bg = (c0 * (1 - ramp) + c1 * ramp).astype(np.uint8).repeat(w, axis=1)  # (h, w, 3)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    u = rng.uniform(0.18, 0.28)  # radius / short side (embedded-web: scaled around web_radius(side))
    r = min(h, w) * (web_radius(side) * u / 0.23 if web else u)
    pos = "left" if rng.random() < 0.5 else "right"
    cx = w * (rng.uniform(0.15, 0.4) if pos == "left" else rng.uniform(0.6, 0.85))
    cx = float(np.clip(cx, r, w - r))
    cy = float(h * rng.uniform(0.3, 0.7))
    box = (cx - r, cy - r, cx + r, cy + r)
    col = tuple(int(c) for c in rgb)
    if cname == "circle":
        d.ellipse(box, fill=col)
    elif cname == "square":
        d.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=col)
    elif cname == "ring":
        d.ellipse(box, outline=col, width=max(2, int(r / 3)))
    elif cname == "moon":  # crescent opening to the right: not mirror-symmetric, so flips are visible
        d.ellipse(box, fill=col)
        bite = tuple(int(v) for v in bg[int(cy), min(w - 1, int(cx))])  # background colour at the centre
        d.ellipse((cx - 0.4 * r, cy - r, cx + 1.6 * r, cy + r), fill=bite)
    elif cname == "bar":
        d.rectangle((cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r), fill=col)
    else:
        d.polygon(_shape_polygon(cname, cx, cy, r), fill=col)
    if ss > 1:
        img = img.resize(out_hw[::-1], Image.Resampling.BOX)
    return img, y, embedded_caption(colname, cname, pos)


def embedded_caption(colour, shape, side):
    """The embedded data's caption: 'a red square on the left' ('an' before a vowel)."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} on the {side}"


def parse_caption(caption):
    """'a magenta star on the right' -> (class id, side 0 = left / 1 = right, colour index into COLORS)."""
    words = caption.lower().replace(".", " ").split()
    colours = list(COLORS)
    shape = next((CLASSES.index(w) for w in words if w in CLASSES), None)
    colour = next((colours.index(w) for w in words if w in colours), None)
    side = next((SIDES.index(w) for w in words if w in SIDES), None)
    if None in (shape, colour, side):
        raise ValueError(f"not an embedded-data caption (shape, colour, left/right): {caption!r}")
    return shape, side, colour


def leftright_prompts(seeds):
    """A balanced prompt set of the embedded data's words: seed s -> shape s % 10, side (s // 10) % 2, colour
    (s // 20) % 8, so every shape appears equally often on each side."""
    colours = list(COLORS)
    return [embedded_caption(colours[(s // 20) % len(colours)], CLASSES[s % len(CLASSES)], SIDES[(s // 10) % 2])
            for s in seeds]


def heldout_indices(ds, n, start=HELDOUT_START):
    """Items of the embedded dataset the run never saw (beyond its length: render_embedded is defined for every
    index); for file datasets, the last n items (seen in training: their ceiling is optimistic)."""
    if hasattr(ds, "length"):  # EmbeddedDataset
        return list(range(start, start + n))
    return list(range(max(0, len(ds) - n), len(ds)))


class EmbeddedDataset(_Augmented, torch.utils.data.Dataset):
    """Procedural default dataset (no files): 10 shape classes, colour + left/right captions, varied sizes;
    web=True is the embedded-web source (render_embedded)."""

    def __init__(self, length=10_000, web=False, **kw):
        super().__init__(**kw)
        self.length, self.web, self.num_classes = length, web, len(CLASSES)

    def __len__(self):
        return self.length

    def original(self, i):
        return render_embedded(self.seed, i, self.web)[0]

    def __getitem__(self, i):
        img, y, caption = render_embedded(self.seed, i, self.web)
        return self.augment(img, (i,), y=y, caption=caption, key=str(i))


# ----------------------------------------------------------------------------- file-based map-style datasets
class ImageFolderDataset(_Augmented, torch.utils.data.Dataset):
    """ImageNet layout root/<class>/<file>; classes sorted by name -> y. Bad files -> None (counted)."""

    def __init__(self, root, **kw):
        super().__init__(**kw)
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.files = [(os.path.join(root, c, f), y) for y, c in enumerate(self.classes)
                      for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMG_EXTS)]
        self.root, self.num_classes = root, len(self.classes)
        if not self.files:  # one line naming the path and the layout expected, not an AssertionError
            raise SystemExit(f"--data-path {root}: no images in class subfolders ({SOURCE_PATHS['imagefolder']})")

    def __len__(self):
        return len(self.files)

    def original(self, i):
        return load_image(self.files[i][0])

    def __getitem__(self, i):
        path, y = self.files[i]
        try:
            img = load_image(path)
        except Exception:  # unreadable, zero-byte, truncated, not an image
            self.n_bad += 1
            return None
        return self.augment(img, (i,), y=y, key=os.path.relpath(path, self.root))


class CaptionFolderDataset(ImageFolderDataset):
    """Images (any depth) with <stem>.txt caption sidecars; a missing caption gives "" and is counted."""

    def __init__(self, root, **kw):
        _Augmented.__init__(self, **kw)
        self.root = root
        self.files = sorted((os.path.join(d, f), None) for d, _, fs in os.walk(root) for f in fs
                            if f.lower().endswith(IMG_EXTS))
        if not self.files:
            raise SystemExit(f"--data-path {root}: no images ({SOURCE_PATHS['captions']})")
        if not any(os.path.exists(os.path.splitext(p)[0] + ".txt") for p, _ in self.files):
            raise SystemExit(f"--data-path {root}: {len(self.files)} images but no <name>.txt caption beside any "
                             "of them (--data imagefolder reads images without captions)")

    def __getitem__(self, i):
        path = self.files[i][0]
        try:
            img = load_image(path)
        except Exception:
            self.n_bad += 1
            return None
        txt = os.path.splitext(path)[0] + ".txt"
        caption = open(txt, encoding="utf-8", errors="replace").read().strip() if os.path.exists(txt) else None
        extra = {"missing_caption": 1} if caption is None else {}
        return self.augment(img, (i,), caption=caption or "", key=os.path.relpath(path, self.root), **extra)


# ----------------------------------------------------------------------------- webdataset shards (iterable)
def expand_shards(path):
    """'dir/', 'dir/{00000..00099}.tar', a glob, or a comma list -> sorted list of .tar files."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    if "{" in path:
        import braceexpand  # installed with webdataset
        return [p for pat in path.split(",") for p in braceexpand.braceexpand(pat)]
    return sorted(p for pat in path.split(",") for p in glob.glob(pat))


_PHI_COL = {k: c for c, k in enumerate(PHI_KEYS)}  # φ column of each key


class WdsDataset(_Augmented, torch.utils.data.IterableDataset):
    """img2dataset / webdataset tar shards (key.jpg|png + key.txt [+ key.json]), streamed with tarfile.

    Iterable: each epoch shuffles the shard order with (seed, epoch); shards are split over DDP ranks and DataLoader
    workers (by sample index instead when there are fewer shards than readers). Augmentation of member j of shard s
    depends on (seed, epoch, s, j) only, so an epoch is reproducible; resume skips `skip` samples of this reader's
    stream (set_epoch(epoch, skip)); with workers, exact resume holds at epoch boundaries (DataLoader interleaving).

    φ is in original-image pixels: img2dataset stores the resized image and the original size in key.json
    (original_height / original_width); crop top/left/size are scaled from the decoded image to it. A sample without
    that size (no json, no such keys, malformed json) uses the decoded size and is counted ("no_orig_size" ->
    collate's n_noorig). `select` (extract_latents): read only these shard indices, whole, split over DataLoader
    workers but not over ranks."""

    def __init__(self, path, **kw):
        super().__init__(**kw)
        self.shards, self.skip, self.select = expand_shards(path), 0, None
        missing = [p for p in self.shards if not os.path.isfile(p)]
        if not self.shards or missing:  # one line naming the path and the layout expected
            what = f"{missing[0]} (of {len(self.shards)}) does not exist" if missing else "no .tar shards there"
            raise SystemExit(f"--data-path {path}: {what} ({SOURCE_PATHS['wds']})")

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def _reader(self):
        wi = torch.utils.data.get_worker_info()
        nw, w = (wi.num_workers, wi.id) if wi else (1, 0)
        if self.select is not None:  # extract_latents splits over ranks itself
            return w, nw
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if dist else int(os.environ.get("RANK", 0))
        world = torch.distributed.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", 1))
        return rank * nw + w, world * nw

    def __iter__(self):
        rid, nread = self._reader()
        if self.select is not None:
            mine, by_shard = list(self.select), False
        else:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
            by_shard = len(self.shards) >= nread
            mine = order[rid::nread] if by_shard else order
        n = 0  # position in this reader's stream
        for s in mine:
            for j, group in enumerate(tar_groups(self.shards[s])):
                if not by_shard and j % nread != rid:
                    continue
                n += 1
                if n <= self.skip:
                    continue
                yield self._decode(group, int(s), j)

    def _decode(self, group, s, j):
        key, files = group
        img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        try:
            img = load_image(io.BytesIO(files[img_ext]))
        except Exception:  # no image member, zero-byte, truncated, not an image
            self.n_bad += 1
            return None
        caption = files["txt"].decode("utf-8", errors="replace").strip() if "txt" in files else None
        extra = {"missing_caption": 1} if caption is None else {}
        orig = original_size(files.get("json"))
        if orig is None:
            extra["no_orig_size"] = 1
        out = self.augment(img, (s, j), caption=caption or "", key=f"{os.path.basename(self.shards[s])}/{key}",
                           **extra)
        if orig is not None:  # decoded-image pixels -> original-image pixels (SDXL: φ is in original pixels)
            (oh, ow), (w, h) = orig, img.size
            phi = out["phi"]
            top, left = _PHI_COL["crop_top"], _PHI_COL["crop_left"]
            phi[top], phi[left] = round(phi[top].item() * oh / h), round(phi[left].item() * ow / w)
            phi[_PHI_COL["orig_h"]], phi[_PHI_COL["orig_w"]] = oh, ow
            out["crop_size"] = max(1, round(out["crop_size"] * min(oh, ow) / min(h, w)))
        return out


def original_size(raw):
    """img2dataset key.json bytes -> (original_height, original_width), or None when absent or malformed."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw.decode("utf-8"))
        oh, ow = meta["original_height"], meta["original_width"]
        if isinstance(oh, bool) or isinstance(ow, bool):
            return None
        oh, ow = int(oh), int(ow)  # ints, or strings / floats holding them
        return (oh, ow) if oh > 0 and ow > 0 and oh == float(meta["original_height"]) \
            and ow == float(meta["original_width"]) else None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, UnicodeDecodeError):
        return None


def tar_groups(path):
    """Yield (key, {ext: bytes}) for consecutive members sharing a key (webdataset convention: key = name up to the
    first dot of the basename). A corrupt shard ends early instead of raising."""
    key, files = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                k, _, ext = base.partition(".")
                k = os.path.join(d, k)
                if k != key and files:
                    yield key, files
                    files = {}
                key, files[ext.lower()] = k, tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError):
        pass  # truncated shard: keep what was read
    if files:
        yield key, files


# ----------------------------------------------------------------------------- latent shards (map-style)
# A latents folder (extract_latents): meta.json + shard_NNNNN/ folders, each renamed into place once complete:
#   latent.npy (N, C, h, w) fp16|fp32, phi.npy (N, 5) float32, crop_size.npy (N,) int64, [y.npy (N,) int64],
#   info.json {"rows", "keys", ["captions"], "n_bad", "n_noorig", "plan"}.
# LatentDataset memory-maps the .npy files (np.load(mmap_mode="r")): a process holds in RAM only what it reads.
SHARD_ARRAYS = ("latent", "phi", "crop_size", "y")
SHARD_INFO = "info.json"


def latent_shard_dirs(root):
    """The complete shard folders of a latents folder (in-progress shard_NNNNN.tmp folders excluded), sorted."""
    return sorted(d for d in glob.glob(os.path.join(root, "shard_*"))
                  if os.path.isdir(d) and os.path.basename(d)[6:].isdigit())


def _open_shard(d, mmap=True):
    """One shard folder -> ({array name: np.memmap}, info dict); a damaged file -> one-line SystemExit naming it."""
    path = os.path.join(d, SHARD_INFO)
    try:
        info = json.load(open(path))
        arrays = {}
        for c in SHARD_ARRAYS:
            path = os.path.join(d, f"{c}.npy")
            if c != "y" or os.path.exists(path):
                arrays[c] = np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as e:
        raise SystemExit(f"{path}: unreadable latent shard file ({type(e).__name__}: {e}); re-run extraction "
                         f"(python latents.py --out ...) after deleting {d}") from None
    return arrays, info


def check_latent_shard(meta, arrays, info, where):
    """The arrays of one shard against meta.json and its own info: any disagreement -> one-line SystemExit naming
    the file (a shard from another extraction, a different VAE, resolution or dtype, a truncated write)."""
    def bad(what, name="latent"):
        raise SystemExit(f"{os.path.join(where, name + '.npy')}: {what} "
                         f"disagrees with meta.json ({os.path.join(os.path.dirname(where), 'meta.json')}); "
                         f"the folder mixes extractions - re-extract into a new --out")
    z, n = arrays.get("latent"), info.get("rows")
    if z is None or z.ndim != 4:
        bad(f"latent array of shape {None if z is None else z.shape} (want N, C, h, w)")
    ch, down, res = meta.get("channels", LATENT_CH), meta.get("down", VAE_DOWN), meta.get("resolution")
    if z.shape[1] != ch:
        bad(f"{z.shape[1]} latent channels vs channels={ch}")
    if res is not None and tuple(z.shape[2:]) != (res // down, res // down):
        bad(f"latent size {z.shape[2]}x{z.shape[3]} vs resolution={res} / down={down}")
    if meta.get("dtype") and str(z.dtype) != meta["dtype"]:
        bad(f"latent dtype {z.dtype} vs dtype={meta['dtype']}")
    for c, v in arrays.items():
        if len(v) != n or (c == "phi" and v.shape[1:] != (len(PHI_KEYS),)):
            bad(f"{c} of shape {v.shape} vs {n} rows of {SHARD_INFO}", c)
    if len(info.get("keys", ())) != n or ("captions" in info and len(info["captions"]) != n):
        bad(f"{n} rows vs its keys/captions", SHARD_INFO)


def latents_resolution(root):
    """The image resolution latent shards were extracted at (their meta.json), or None when it cannot be read
    (LatentDataset then says why in one line)."""
    try:
        with open(os.path.join(root, "meta.json")) as f:
            return json.load(f).get("resolution")
    except (OSError, ValueError):
        return None


class LatentDataset(torch.utils.data.Dataset):
    """Shards written by extract_latents: K augmented crops per image with their φ; epoch e uses crop
    rng(seed, e, i) of image i, so control conditioning still works from cached latents. The arrays are
    memory-mapped (self.arrays[shard][name] are np.memmap), opened again in each DataLoader worker."""

    def __init__(self, root, seed=0, **_):
        self.root = root
        try:
            self.meta = json.load(open(os.path.join(root, "meta.json")))
        except (OSError, ValueError) as e:
            raise SystemExit(f"{os.path.join(root, 'meta.json')}: {type(e).__name__}; not a finished latents folder "
                             f"(python latents.py --out {root} writes it after the last shard)") from None
        dirs = latent_shard_dirs(root)
        if not dirs:
            raise SystemExit(f"{root}: no shard_NNNNN/ folders (python latents.py --out {root} writes them)")
        m = self.meta
        if dirs and m.get("shards") is not None and len(dirs) != m["shards"]:
            raise SystemExit(f"{os.path.join(root, 'meta.json')}: {m['shards']} shards vs {len(dirs)} shard folders "
                             f"in {root} (an unfinished or mixed extraction)")
        self.shards = dirs
        self.arrays, keys, self.captions, counts, has_caps = [], [], [], [], set()
        for d in self.shards:
            arrays, info = _open_shard(d)
            check_latent_shard(m, arrays, info, d)
            if info["rows"]:  # (an empty shard has no columns to disagree with)
                has_caps.add("captions" in info)
            if len(has_caps) > 1:
                raise SystemExit(f"{d}: captions in some shards of {root} but not in others (mixed extractions)")
            self.arrays.append(arrays)
            keys += info["keys"]
            self.captions += info.get("captions", [])
            counts.append(info["rows"])
        if m.get("rows") is not None and sum(counts) != m["rows"]:
            raise SystemExit(f"{os.path.join(root, 'meta.json')}: rows={m['rows']} vs {sum(counts)} rows in the "
                             f"shards of {root}")
        self.keys, self.offsets = keys, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        groups = {}
        for row, key in enumerate(keys):
            groups.setdefault(key, []).append(row)
        self.rows = list(groups.values())  # image -> its K (global) rows
        self.seed, self.epoch, self.n_bad = seed, 0, 0
        self.num_classes, self.resolution = m.get("num_classes"), m.get("resolution")
        # the run spec's "latent" section (shards written before it was recorded: the SD VAE)
        self.latent = dict(vae=m.get("vae") or None, scale=m.get("scale", VAE_SCALE), channels=m.get("channels", LATENT_CH),
                           down=m.get("down", VAE_DOWN))

    def __getstate__(self):  # to a spawned worker: paths, not the mapped arrays
        return {**self.__dict__, "arrays": None}

    def __setstate__(self, st):
        self.__dict__.update(st)
        if self.arrays is None:
            self.arrays = [_open_shard(d)[0] for d in self.shards]

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        rows = self.rows[i]
        r = rows[int(np.random.default_rng([self.seed, self.epoch, i]).integers(len(rows)))]
        s = int(np.searchsorted(self.offsets, r, side="right")) - 1
        a, q = self.arrays[s], r - int(self.offsets[s])
        out = {"latent": torch.from_numpy(np.array(a["latent"][q], dtype=np.float32)),
               "phi": torch.from_numpy(np.array(a["phi"][q], dtype=np.float32)),
               "crop_size": int(a["crop_size"][q]), "key": self.keys[r]}
        if "y" in a:
            out["y"] = int(a["y"][q])
        if self.captions:
            out["caption"] = self.captions[r]
        return out


# ----------------------------------------------------------------------------- factory + collate
def build_dataset(source="embedded", path=None, resolution=32, crop="global", flip=True, seed=0, length=10_000):
    """One entry point for every source (SOURCES). `length` sizes the embedded dataset."""
    kw = dict(resolution=resolution, crop=crop, flip=flip, seed=seed)
    if source in EMBEDDED:
        return EmbeddedDataset(length=length, web=source == "embedded-web", **kw)
    if source not in SOURCES:
        raise SystemExit(f"--data {source}: choose one of {', '.join(SOURCES)}")
    if not path:  # one line naming the flag, not a traceback
        raise SystemExit(f"--data {source} needs --data-path ({SOURCE_PATHS[source]})")
    if source != "wds" and not os.path.isdir(path):
        raise SystemExit(f"--data-path {path}: no such folder (--data {source} reads {SOURCE_PATHS[source]})")
    return {"imagefolder": ImageFolderDataset, "captions": CaptionFolderDataset, "wds": WdsDataset,
            "latents": LatentDataset}[source](path, **kw)


def collate(samples):
    """Drop bad samples (None), stack the rest. Adds n_bad (dropped), n_nocap (missing captions) and n_noorig
    (webdataset samples without an original size in their key.json) counts."""
    good = [s for s in samples if s is not None]
    out = {"n_bad": len(samples) - len(good), "n_nocap": sum(s.pop("missing_caption", 0) for s in good),
           "n_noorig": sum(s.pop("no_orig_size", 0) for s in good)}
    if not good:
        return out  # every sample was bad: caller skips this batch
    for k in good[0]:
        v = [s[k] for s in good]
        out[k] = torch.stack(v) if torch.is_tensor(v[0]) else torch.tensor(v) if k in ("y", "crop_size") else v
    return out


# ----------------------------------------------------------------------------- images for evaluation (uint8)
def center_crop_resize(img, res):
    """ADM reference-batch convention: BOX-halve while >= 2x too big, BICUBIC to size, centre crop."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - res) // 2, (img.size[1] - res) // 2
    return img.crop((left, top, left + res, top + res))


def image_uint8(img, res=None):
    """PIL image -> (3, H, W) uint8 RGB, centre-cropped to res x res (center_crop_resize) when res is given."""
    img = img.convert("RGB")
    if res is not None and img.size != (res, res):
        img = center_crop_resize(img, res)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def image_files(folder):
    """Image files under folder, recursive, sorted."""
    return sorted(f for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                  if f.lower().endswith(IMG_EXTS))


def balanced_subset(files, n, seed=0):
    """n of the files, seeded and balanced over their folders (ImageNet's class folders): each folder's files
    shuffled by (seed), then taken round-robin over the folders until n; the same n and seed give the same subset.
    The first n sorted files would be the first n / 1300 classes of ImageNet and bias FID. n above the count is
    a one-line error naming --ref-max."""
    if n > len(files):
        raise SystemExit(f"--ref-max {n}: the reference holds only {len(files)} images")
    groups = {}
    for f in files:
        groups.setdefault(os.path.dirname(f), []).append(f)
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(g)) for _, g in sorted(groups.items())]
    out = []
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return sorted(out)


def iter_images(source, res=None, limit=None, seed=0):
    """uint8 (3,H,W) tensors from a folder / ImageFolder tree (recursive, sorted), an ADM-style .npz batch
    (arr_0, NHWC uint8) or tar shards (expand_shards: a folder of .tar is read as images first, so give shards
    as a glob, a brace pattern or a comma list), centre-cropped to res if given. limit: a folder gives the
    seeded class-balanced subset (balanced_subset), an .npz a seeded random subset, shards their first images."""
    if source.endswith(".npz"):
        arr = np.load(source)["arr_0"]
        if limit is not None and limit > len(arr):
            raise SystemExit(f"--ref-max {limit}: {source} holds only {len(arr)} images")
        idx = np.sort(np.random.default_rng(seed).permutation(len(arr))[:limit]) if limit else range(len(arr))
        return (torch.from_numpy(arr[i]).permute(2, 0, 1) for i in idx)
    if os.path.isdir(source):
        files = image_files(source)
        if not files:
            raise SystemExit(f"no images in {source}")
        files = balanced_subset(files, limit, seed) if limit else files
        return (image_uint8(Image.open(f), res) for f in files)
    shards = expand_shards(source)
    if not shards or not all(s.endswith(".tar") and os.path.isfile(s) for s in shards):
        raise SystemExit(f"{source!r} is not a folder, .tar shard(s), .npz, 'train' or 'embedded'")

    def tar_images():
        for shard in shards:
            for _, files in tar_groups(shard):
                yield from (image_uint8(Image.open(io.BytesIO(b)), res) for ext, b in files.items()
                            if ("." + ext).endswith(IMG_EXTS))
    return itertools.islice(tar_images(), limit)


def dataset_images(ds, limit=None):
    """uint8 images of a dataset of this file (built with crop="center", flip=False for evaluation): the first
    `limit` decodable ones, of a map-style dataset or of a shard stream."""
    if isinstance(ds, torch.utils.data.IterableDataset):
        items = iter(ds)
    else:
        items = (ds[i] for i in range(len(ds)))
    return (to_uint8(s["image"]) for s in itertools.islice((s for s in items if s is not None), limit))


def dataset_images_at(ds, indices):
    """uint8 images of the given items of a map-style dataset."""
    return (to_uint8(ds[i]["image"]) for i in indices)


def condition_pool(ds, n=1000):
    """The training samples evaluation draws its conditions from: the dataset itself when it is indexable, else
    (webdataset shards) the first n samples of its stream."""
    return first_items(ds, n) if isinstance(ds, torch.utils.data.IterableDataset) else ds


def preview(path, n=8, seed=0, cell=112):
    """README figure: embedded originals (letterboxed, mixed-crop box in red) beside the training crop, captioned."""
    from PIL import ImageFont
    ds = EmbeddedDataset(length=n, resolution=cell, crop="mix", seed=seed)
    font = ImageFont.load_default(size=11)
    pad, cols = 30, 4
    grid = Image.new("RGB", (cols * (2 * cell + 12), (n // cols) * (cell + pad)), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    for i in range(n):
        s, orig = ds[i], ds.original(i)
        top, left, flip, h, w = s["phi"].tolist()
        f = cell / max(h, w)  # letterbox the original into a cell
        o = orig.resize((max(1, round(w * f)), max(1, round(h * f))))
        x0, y0 = (i % cols) * (2 * cell + 12), (i // cols) * (cell + pad)
        grid.paste(o, (x0, y0))
        side = s["crop_size"]
        d.rectangle((x0 + left * f, y0 + top * f, x0 + (left + side) * f, y0 + (top + side) * f), outline=(255, 0, 0))
        crop = to_uint8(s["image"]).permute(1, 2, 0).numpy()
        grid.paste(Image.fromarray(crop), (x0 + cell + 2, y0))
        d.text((x0, y0 + cell + 1), s["caption"], fill=(0, 0, 0), font=font)
        info = f"orig {int(h)}x{int(w)}  crop {side}px @({int(top)},{int(left)})  flip={int(flip)}"
        d.text((x0, y0 + cell + 14), info, fill=(90, 90, 90), font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)
