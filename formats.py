"""
The field's files of prompts and samples, read and written by sample.py and evaluate.py: prompt files (one caption
per line, or a COCO captions json as the COCO FID protocol reads it), sample folders (one {seed:06d}.png per image)
and ADM (openai/guided-diffusion) sample batches (.npz: arr_0 uint8 images (N, H, W, 3), arr_1 int64 labels), the
format ADM's evaluator and DiT's sample_ddp score. Imports data only (the project's image helpers).
"""
import glob
import json
import os

import numpy as np
import torch
from PIL import Image

import data


def read_prompts(path, flag="--prompts"):
    """(captions, format) of a prompts FILE, in generation order: a .json is a COCO captions file
    (captions_val2014.json), anything else has one caption per line (stripped, blank lines skipped).
    An unreadable, empty or caption-less file is a one-line error naming the flag and the path."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"{flag} {path}: cannot read it ({e.strerror if isinstance(e, OSError) else 'not UTF-8'})")
    if path.lower().endswith(".json"):
        captions, fmt = coco_captions(path, text, flag), "coco"
    else:
        captions, fmt = [line.strip() for line in text.splitlines() if line.strip()], "lines"
    if not captions:
        raise SystemExit(f"{flag} {path} holds no captions")
    return captions, fmt


def coco_captions(path, text, flag="--prompts"):
    """One caption per image, as the COCO FID protocol generates one image per validation image: the first caption
    listed for each image_id, images in ascending image_id order (deterministic; COCO lists ~5 per image).
    Inner whitespace is collapsed, as some COCO captions hold line breaks."""
    try:
        first = {}
        for a in sorted(json.loads(text)["annotations"], key=lambda a: a["image_id"]):  # stable: file order kept
            caption = " ".join(a["caption"].split())
            if caption:
                first.setdefault(a["image_id"], caption)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"{flag} {path} is not a COCO captions json ('annotations': [{{'image_id', 'caption'}}, "
                         f"...]): {type(e).__name__} {e}")
    return list(first.values())


def write_adm_batch(path, images, labels=None):
    """An ADM (guided-diffusion) sample batch, written atomically: np.savez with arr_0 = uint8 images (N, H, W, 3)
    and, when labels are given, arr_1 = int64 labels (N,), the two arrays ADM's image_sample.py saves for a
    class-conditional model (arr_0 alone otherwise). images: uint8 (N, 3, H, W) or [-1, 1] floats, which are
    quantised as data.to_pil stores a PNG (ADM truncates instead: its batches differ by at most 1 per channel)."""
    images = images if images.dtype == torch.uint8 else data.to_uint8(images)
    arrays = [images.permute(0, 2, 3, 1).numpy()]  # a strided view: np.save writes it in C order, chunk by chunk
    if labels is not None:
        arrays.append(np.asarray(labels, dtype=np.int64))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with data.atomic_write(path) as f:  # a file object: np.savez keeps the name as given
        np.savez(f, *arrays)


def read_samples(images, K=None):
    """(uint8 images (N, 3, R, R), class labels (N,) or None, files or None): a samples folder's PNGs sorted by
    seed, labelled seed % K as generated (given K); or an ADM sample batch .npz: arr_0 (N, H, W, 3), labels arr_1."""
    if images.endswith(".npz"):
        f = np.load(images)
        y = torch.from_numpy(f["arr_1"]) if "arr_1" in f.files else None
        return torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous(), y, None  # the PNGs' memory layout
    files = sorted(glob.glob(os.path.join(images, "*.png")))
    y = torch.tensor([int(os.path.basename(f)[:-4]) % K for f in files]) if K else None
    return torch.stack([data.image_uint8(Image.open(f)) for f in files]), y, files
