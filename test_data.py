"""Tests of data.py: `.venv/bin/python -m pytest -q test_data.py` (CPU, seconds). Crops and φ re-cut from the
originals with numpy, bad images (truncated, empty, not an image) skipped and counted in every source, latent shards
written and served back (both stored crops, memory-mapped, resumed after a kill, sharded over ranks, the previous
format), their meta.json checked against the shards in one line, img2dataset's original sizes, and the class-balanced
--ref-max subset."""
import io
import json
import os
import pickle
import tarfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail at once, never retry

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import latents  # noqa: E402


# ----------------------------------------------------------------------------- data.py: crops, bad files, latent shards

def _image_bytes(seed, fmt="JPEG", size=(40, 56)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _bad_files():
    """The three kinds of bad data: truncated JPEG, zero-byte file, a text file named like an image."""
    good = _image_bytes(99)
    return {"trunc.jpg": good[: len(good) // 2], "empty.jpg": b"", "notimage.jpg": b"this is not an image\n"}


def test_crop_metadata():
    torch.manual_seed(0)
    R = 24
    for crop in ("global", "local", "mix", "center"):
        ds = data.build_dataset("embedded", resolution=R, crop=crop, seed=3, length=40)
        flips = set()
        for i in range(0, 40, 3):
            s = ds[i]
            top, left, flip, h, w = (int(v) for v in s["phi"])
            orig = np.asarray(ds.original(i))
            assert (h, w) == orig.shape[:2]  # φ sizes are the original's, in pixels
            side = s["crop_size"]
            if crop != "center":
                lo, hi = data.CROP_RANGES[crop]
                assert lo - 0.01 <= side / min(h, w) <= hi + 0.01
            assert 0 <= top <= h - side and 0 <= left <= w - side
            # re-crop the original with φ (numpy slicing, independent of the loader) -> same pixels
            patch = Image.fromarray(orig[top:top + side, left:left + side]).resize((R, R), Image.BICUBIC)
            ref = torch.from_numpy(np.asarray(patch).copy()).permute(2, 0, 1).float() / 127.5 - 1
            ref = ref.flip(-1) if flip else ref
            assert torch.equal(s["image"], ref), (crop, i)
            flips.add(flip)
            assert torch.equal(ds[i]["image"], s["image"])  # deterministic given (seed, epoch, i)
        assert flips == {0, 1}  # flipped samples were exercised (centre crops flip too: training uses them)
    ds = data.build_dataset("embedded", resolution=R, crop="center", flip=False, seed=3, length=40)
    assert {int(ds[i]["phi"][2]) for i in range(40)} == {0}  # --no-flip / evaluation sets: never flipped
    ds.crop = "mix"
    a = ds[5]["phi"]
    ds.set_epoch(1)
    assert not torch.equal(a, ds[5]["phi"])  # new epoch, new augmentation


def test_embedded_web_sizes_show():
    """embedded-web: the original's size shows in the 16 px crop the model sees (what size conditioning acts on):
    small originals are soft (upsampled) and filled by their object, large ones sharp with a small object; item i
    keeps the class and caption of embedded item i at another size."""
    ds = data.build_dataset("embedded-web", resolution=16, crop="center", flip=False, seed=0, length=300)
    small, large = [], []
    for i in range(300):
        h, w = (int(v) for v in ds[i]["phi"][3:5])
        assert (h, w) == np.asarray(ds.original(i)).shape[:2]  # φ records the web original's size
        assert data.WEB_SIDES[0] <= min(h, w) <= data.WEB_SIDES[1] and max(h, w) <= 2 * min(h, w)
        x = (ds[i]["image"].double() + 1) * 127.5  # uint8 scale
        step = (x[:, :, 1:] - x[:, :, :-1]).abs().max().item()  # the sharpest horizontal edge
        fg = (x.amax(0) >= 70).double().mean().item()  # backgrounds are < 70 in every channel
        (small if min(h, w) <= 8 else large if min(h, w) >= 48 else []).append((step, fg))
    assert len(small) >= 10 and len(large) >= 40
    (s_step, s_fg), (l_step, l_fg) = np.mean(small, 0), np.mean(large, 0)
    assert s_step < 0.75 * l_step, (s_step, l_step)  # soft vs sharp edges
    assert s_fg > 3 * l_fg, (s_fg, l_fg)  # the object fills a small original, not a large one
    assert data.web_radius(data.WEB_SIDES[0]) == data.WEB_RADIUS[0]
    assert abs(data.web_radius(data.WEB_SIDES[1]) - data.WEB_RADIUS[1]) < 1e-12
    a, b = data.render_embedded(0, 7), data.render_embedded(0, 7, web=True)
    assert a[1:] == b[1:] and min(a[0].size) >= 48 and a[0].size != b[0].size  # same class and caption, other size


def test_bad_images_skipped(tmp_path):
    torch.manual_seed(0)
    # ImageFolder: 3 good images in 2 classes + 3 bad files
    for cls, files in {"cat": {"a.jpg": _image_bytes(0), "b.png": _image_bytes(1, "PNG"), **_bad_files()},
                       "dog": {"c.jpg": _image_bytes(2)}}.items():
        os.makedirs(tmp_path / "folder" / cls)
        for name, b in files.items():
            (tmp_path / "folder" / cls / name).write_bytes(b)
    ds = data.build_dataset("imagefolder", str(tmp_path / "folder"), resolution=16)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=data.collate))
    assert sum(len(b.get("y", [])) for b in batches) == 3 and sum(b["n_bad"] for b in batches) == 3
    assert sorted(sum((b.get("y", torch.zeros(0)).tolist() for b in batches), [])) == [0, 0, 1]
    # tar shard (img2dataset layout): 2 good (one without caption) + 3 bad
    members = {"000.jpg": _image_bytes(3), "000.txt": b"a good one", "001.jpg": _bad_files()["trunc.jpg"],
               "001.txt": b"x", "002.jpg": b"", "002.txt": b"y", "003.png": b"not a png", "003.txt": b"z",
               "004.png": _image_bytes(4, "PNG")}
    with tarfile.open(tmp_path / "shard-00000.tar", "w") as tar:
        for name, b in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    wds = data.build_dataset("wds", str(tmp_path / "shard-*.tar"), resolution=16)
    batches = list(torch.utils.data.DataLoader(wds, batch_size=2, collate_fn=data.collate))
    caps = sum((b.get("caption", []) for b in batches), [])
    assert caps == ["a good one", ""]
    assert sum(b["n_bad"] for b in batches) == 3 and sum(b["n_nocap"] for b in batches) == 1
    # caption sidecar folder: missing caption -> "" and counted; bad file -> skipped
    os.makedirs(tmp_path / "caps")
    (tmp_path / "caps" / "p.jpg").write_bytes(_image_bytes(5))
    (tmp_path / "caps" / "p.txt").write_text("hello")
    (tmp_path / "caps" / "q.jpg").write_bytes(_image_bytes(6))
    (tmp_path / "caps" / "r.jpg").write_bytes(b"")
    b = data.collate([s for s in data.build_dataset("captions", str(tmp_path / "caps"), resolution=16)])
    assert b["caption"] == ["hello", ""] and b["n_bad"] == 1 and b["n_nocap"] == 1


def test_latent_shards_roundtrip(tmp_path, fp32_tol):
    torch.manual_seed(0)
    ds = data.build_dataset("embedded", resolution=32, crop="mix", seed=1, length=6)
    vae = latents.load_vae("tiny")
    meta = latents.extract_latents(ds, vae, str(tmp_path), k=2, shard_size=5, dtype=torch.float32)
    assert meta["rows"] == 12 and len([f for f in os.listdir(tmp_path) if f.startswith("shard_")]) == 3
    assert json.load(open(tmp_path / "meta.json"))["scale"] == data.VAE_SCALE
    expected = {}  # (key, φ) -> latent, computed independently of the writer
    for j in range(2):
        ds.set_epoch(j)
        b = data.collate([ds[i] for i in range(6)])
        z = latents.encode(vae, b["image"])
        assert z.shape == (6, 4, 4, 4)
        for i in range(6):
            expected[(b["key"][i], tuple(b["phi"][i].tolist()))] = (z[i], b["y"][i].item(), b["caption"][i])
    lds = data.build_dataset("latents", str(tmp_path), seed=0)
    assert len(lds) == 6
    seen = set()
    for e in range(16):
        lds.set_epoch(e)
        for i in range(6):
            s = lds[i]
            z, y, cap = expected[(s["key"], tuple(s["phi"].tolist()))]  # same φ as written
            assert torch.allclose(s["latent"], z, atol=fp32_tol(z, 8)) and s["y"] == y and s["caption"] == cap  # fp32
            seen.add((s["key"], tuple(s["phi"].tolist())))
    assert len(seen) == 12  # both stored crops of every image are served across epochs
    with pytest.raises(SystemExit, match="--vae"):  # missing weights: one line naming the flag
        latents.load_vae("/nonexistent/vae")
    x = latents.decode(vae, s["latent"][None])
    assert x.shape == (1, 3, 32, 32) and x.abs().max() <= 1


def test_ref_max_is_class_balanced(tmp_path):
    """--ref-max on an ImageFolder takes a seeded subset balanced over the class folders (not the first classes of
    the sorted list), the same for the same seed; above the folder's size it is a one-line error."""
    files = [str(tmp_path / f"c{c}" / f"{i:03d}.png") for c in range(4) for i in range(10)]
    sub = data.balanced_subset(files, 8, seed=0)
    per_class = [sum(f.startswith(str(tmp_path / f"c{c}") + os.sep) for f in sub) for c in range(4)]
    assert per_class == [2, 2, 2, 2] and len(set(sub)) == 8
    assert sub == data.balanced_subset(files, 8, seed=0) != data.balanced_subset(files, 8, seed=1)
    assert sorted(data.balanced_subset(files, 40)) == sorted(files)
    assert sum(f.startswith(str(tmp_path / "c0") + os.sep) for f in data.balanced_subset(files, 6)) == 2  # 2,2,1,1
    with pytest.raises(SystemExit, match="--ref-max 41: the reference holds only 40 images"):
        data.balanced_subset(files, 41)


# ----------------------------------------------------------------------------- data formats at real size
def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, b in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))


def _jpeg_bytes(seed, w=64, h=48):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_img2dataset_original_size(tmp_path):
    orig = json.dumps(dict(key="000", original_width=640, original_height=480, width=64, height=48)).encode()
    members = {"000.jpg": _jpeg_bytes(0), "000.txt": b"resized", "000.json": orig,
               "001.jpg": _jpeg_bytes(1), "001.txt": b"no json",
               "002.jpg": _jpeg_bytes(2), "002.txt": b"bad json", "002.json": b"{not json",
               "003.jpg": _jpeg_bytes(3), "003.txt": b"no size keys", "003.json": b'{"width": 64, "height": 48}',
               "004.jpg": _jpeg_bytes(4), "004.txt": b"not an object", "004.json": b"[480, 640]"}
    _write_tar(tmp_path / "00000.tar", members)
    ds = data.build_dataset("wds", str(tmp_path), resolution=16, crop="mix", seed=3)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=data.collate))
    assert sum(b["n_bad"] for b in batches) == 0 and sum(b["n_noorig"] for b in batches) == 4  # no crash, counted
    got = {k.split("/")[-1]: (phi, int(cs), img) for b in batches
           for k, phi, cs, img in zip(b["key"], b["phi"], b["crop_size"], b["image"])}
    assert list(got) == ["000", "001", "002", "003", "004"]
    for j, key in enumerate(got):
        phi, side_o, img = got[key]
        rng = np.random.default_rng([3, 0, 0, j])  # the (seed, epoch, s, j) augmentation, on the decoded 48x64 image
        top, left, side = data.sample_crop(48, 64, "mix", rng)
        flip = bool(rng.random() < data.FLIP_P)
        dec = data.load_image(io.BytesIO(members[f"{key}.jpg"]))
        assert torch.equal(img, data.crop_image(dec, top, left, side, flip, 16))  # pixels: the decoded image's crop
        if key == "000":  # φ in original (480 x 640) pixels: crop coordinates scaled by 10
            assert phi.tolist() == [round(top * 10), round(left * 10), float(flip), 480, 640] and side_o == side * 10
        else:  # decoded size, exactly what the dataset gave before key.json was read
            assert phi.tolist() == [top, left, float(flip), 48, 64] and side_o == side
            assert torch.equal(phi, ds.augment(dec, (0, j))["phi"])
    again = [s["phi"] for s in ds]  # deterministic given (seed, epoch, s, j)
    assert all(torch.equal(a, got[k][0]) for a, k in zip(again, got))
    assert data.typical_orig_size(ds, 1) == [480.0, 640.0]


def _expected_latents(ds, vae, k):
    expected = {}  # (key, φ) -> (latent, y, caption), computed independently of the writer
    for j in range(k):
        ds.set_epoch(j)
        b = data.collate([ds[i] for i in range(len(ds))])
        z = latents.encode(vae, b["image"])
        for i in range(len(ds)):
            expected[(b["key"][i], tuple(b["phi"][i].tolist()))] = (z[i], b["y"][i].item(), b["caption"][i])
    return expected


def _shard_mtimes(out):
    return {f: os.stat(os.path.join(out, f, "info.json")).st_mtime_ns for f in sorted(os.listdir(out))
            if f.startswith("shard_")}


def test_latents_memory_mapped(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ds = data.build_dataset("embedded", resolution=32, crop="mix", seed=1, length=6)
    vae = latents.load_vae("tiny")
    out = str(tmp_path / "lat")
    meta = latents.extract_latents(ds, vae, out, k=2, shard_size=5, vae_name="tiny")  # float16, the CLI default
    assert meta["rows"] == 12 and meta["shards"] == 3 and meta["format"] == "npy" and meta["dtype"] == "float16"
    assert sorted(f for f in os.listdir(out) if f.startswith("shard_")) == [f"shard_{n:05d}" for n in range(3)]
    expected = _expected_latents(ds, vae, 2)
    lds = data.build_dataset("latents", out, seed=0)
    assert len(lds) == 6 and lds.latent == dict(vae="tiny", scale=data.VAE_SCALE, channels=4, down=8)
    for arrays in lds.arrays:  # mapped, not loaded
        assert set(arrays) == {"latent", "phi", "crop_size", "y"}
        assert all(isinstance(v, np.memmap) for v in arrays.values()) and arrays["latent"].dtype == np.float16
    seen = set()
    for e in range(16):
        lds.set_epoch(e)
        for i in range(6):
            s = lds[i]
            z, y, cap = expected[(s["key"], tuple(s["phi"].tolist()))]
            assert s["latent"].dtype == torch.float32 and torch.allclose(s["latent"], z.half().float(), atol=2e-3)
            assert s["y"] == y and s["caption"] == cap
            seen.add((s["key"], tuple(s["phi"].tolist())))
    assert len(seen) == 12  # both stored crops of every image are served across epochs
    twin = pickle.loads(pickle.dumps(lds))  # a spawned DataLoader worker maps the files again
    assert isinstance(twin.arrays[0]["latent"], np.memmap) and torch.equal(twin[3]["latent"], lds[3]["latent"])
    b = next(iter(torch.utils.data.DataLoader(lds, batch_size=6, num_workers=1, collate_fn=data.collate)))
    assert b["latent"].shape == (6, 4, 4, 4) and b["n_bad"] == 0

    # resume: finished shards are skipped; a killed shard (stale .tmp, no folder) is written again, identically
    encoded = []
    real_encode = latents.encode
    monkeypatch.setattr(latents, "encode", lambda v, x, *a, **kw: encoded.append(len(x)) or real_encode(v, x, *a, **kw))
    before, ref = _shard_mtimes(out), np.array(lds.arrays[1]["latent"])
    os.rename(os.path.join(out, "shard_00001"), os.path.join(out, "shard_00001.tmp"))
    os.remove(os.path.join(out, "meta.json"))
    with pytest.raises(SystemExit, match="meta.json"):
        data.build_dataset("latents", out)
    assert latents.extract_latents(ds, vae, out, k=2, shard_size=5, vae_name="tiny") == meta
    assert sum(encoded) == 5 and not os.path.exists(os.path.join(out, "shard_00001.tmp"))
    after = _shard_mtimes(out)
    assert after["shard_00000"] == before["shard_00000"] and after["shard_00002"] == before["shard_00002"]
    assert np.array_equal(np.load(os.path.join(out, "shard_00001", "latent.npy")), ref)
    encoded.clear()
    assert latents.extract_latents(ds, vae, out, k=2, shard_size=5, vae_name="tiny") == meta and not encoded
    with pytest.raises(SystemExit, match="shard_00000: written with other settings.*seed"):
        latents.extract_latents(data.build_dataset("embedded", resolution=32, crop="mix", seed=2, length=6), vae, out,
                             k=2, shard_size=5, vae_name="tiny")

    # sharded over ranks: rank r of w writes shards r::w; the last to finish writes the same meta.json
    out2 = str(tmp_path / "ranks")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert latents.extract_latents(ds, vae, out2, k=2, shard_size=5, vae_name="tiny") == \
        dict(complete=False, shards=3, finished=1)
    assert sorted(os.listdir(out2)) == ["shard_00001"]
    monkeypatch.setenv("RANK", "0")
    assert latents.extract_latents(ds, vae, out2, k=2, shard_size=5, vae_name="tiny") == meta
    for n in range(3):
        for c in ("latent", "phi", "crop_size", "y"):
            a, b = (np.load(os.path.join(o, f"shard_{n:05d}", f"{c}.npy")) for o in (out, out2))
            assert np.array_equal(a, b), (n, c)
    assert torch.equal(pickle.loads(pickle.dumps(data.build_dataset("latents", out)))[1]["latent"],
                       data.build_dataset("latents", out)[1]["latent"])  # a worker's copy reopens the shards


def test_latent_meta_mismatch(tmp_path):
    ds = data.build_dataset("embedded", resolution=32, seed=0, length=3)
    out = tmp_path / "lat"
    latents.extract_latents(ds, latents.load_vae("tiny"), str(out), k=1, shard_size=2, dtype=torch.float32)
    good = json.loads((out / "meta.json").read_text())
    data.build_dataset("latents", str(out))

    def refused(match, **change):
        (out / "meta.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(SystemExit, match=match) as e:
            data.build_dataset("latents", str(out))
        assert "\n" not in str(e.value)  # one line

    refused(r"shard_00000/latent\.npy: 4 latent channels vs channels=8", channels=8)
    refused(r"shard_00000/latent\.npy: latent size 4x4 vs resolution=64", resolution=64)
    refused(r"shard_00000/latent\.npy: latent dtype float32 vs dtype=float16", dtype="float16")
    refused(r"meta\.json: rows=5 vs 3 rows", rows=5)
    refused(r"meta\.json: 4 shards vs 2 shard folders", shards=4)
    (out / "meta.json").write_text(json.dumps(good))
    np.save(out / "shard_00001" / "phi.npy", np.zeros((2, 5), np.float32))  # 2 rows in a 1-row shard
    with pytest.raises(SystemExit, match=r"shard_00001/phi\.npy: phi of shape \(2, 5\) vs 1 rows"):
        data.build_dataset("latents", str(out))
    (out / "shard_00001" / "latent.npy").write_bytes(b"truncated")
    with pytest.raises(SystemExit, match=r"shard_00001/latent\.npy: unreadable"):
        data.build_dataset("latents", str(out))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "meta.json").write_text(json.dumps(good))
    with pytest.raises(SystemExit, match=r"empty: no shard_NNNNN/ folders \(python latents\.py --out"):
        data.build_dataset("latents", str(empty))


# ----------------------------------------------------------------------------- bad data paths: one line each
def _bad_layouts(root):
    """Each case: (train.py flags, words the one line must hold). The folders are written here."""
    empty = root / "empty"
    (empty / "cls_a").mkdir(parents=True)  # a class folder with no image in it
    nocap = root / "nocap"
    nocap.mkdir()
    (nocap / "a.jpg").write_bytes(_jpeg_bytes(0))  # an image without its a.txt
    notar = root / "notar"
    notar.mkdir()
    (notar / "readme.txt").write_text("no shards here\n")
    txtless = root / "txtless"
    txtless.mkdir()
    _write_tar(txtless / "00000.tar", {f"{k:05d}.jpg": _jpeg_bytes(k) for k in range(3)})  # images, no .txt
    broken = root / "broken"
    broken.mkdir()
    _write_tar(broken / "00000.tar", {f"{k:05d}.jpg": b"not a jpeg" for k in range(3)})
    return [
        (["--data", "imagefolder", "--data-path", str(root / "absent")], ["absent", "no such folder"]),
        (["--data", "imagefolder", "--data-path", str(empty)], [str(empty), "no images", "<class>"]),
        (["--data", "captions", "--data-path", str(nocap), "--semantic", "text"], [str(nocap), ".txt caption"]),
        (["--data", "wds", "--data-path", str(notar)], [str(notar), "no .tar shards"]),
        (["--data", "wds", "--data-path", str(notar), "--semantic", "text"], [str(notar), "no .tar shards"]),
        (["--data", "wds", "--data-path", str(root / "s-{00000..00003}.tar")], ["s-00000.tar", "does not exist"]),
        (["--data", "wds", "--data-path", str(txtless), "--semantic", "text"], [str(txtless), "no captions", ".txt"]),
        (["--data", "wds", "--data-path", str(broken), "--semantic", "text"], [str(broken), "no readable sample"]),
        (["--data", "latents", "--data-path", str(notar)], [str(notar), "meta.json"]),
    ]


def test_bad_data_paths(tmp_path):
    """A missing folder, an empty ImageFolder, images without captions, a folder without shards (with --semantic text
    too: it must say "no shards", not "no captions"), a shard pattern naming absent files, shards without the key the
    mode needs, shards of unreadable images, a folder that is not a latents folder: each stops train.py with
    SystemExit (one line, no traceback) naming the path and what was expected, before anything is written."""
    import subprocess
    import sys
    import train
    cases = _bad_layouts(tmp_path)
    for k, (flags, words) in enumerate(cases):
        out = tmp_path / f"out{k}"
        with pytest.raises(SystemExit) as e:
            train.main([*flags, "--max-steps", "1", "--no-progress", "--device", "cpu", "--out-dir", str(out)])
        line = str(e.value.code)
        assert "\n" not in line and all(w in line for w in words), (flags, line)
        assert not (out / "ckpt.pt").exists()
    # the same through the interpreter: the message is the last line of stderr, and no traceback
    flags, words = cases[6]
    r = subprocess.run([sys.executable, "train.py", *flags, "--out-dir", str(tmp_path / "o")], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.abspath(__file__)), env=dict(os.environ,
                       HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and all(w in r.stderr for w in words), r.stderr


def test_latents_progress(tmp_path):
    """python latents.py shows a bar with the image count and ETA on stderr; --no-progress shows none; both write
    the same shards."""
    import subprocess
    import sys
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    base = [sys.executable, "latents.py", "--length", "6", "--resolution", "16", "--vae", "tiny", "--device", "cpu",
            "--num-workers", "0", "--shard-size", "4", "--dtype", "float32"]
    cwd = os.path.dirname(os.path.abspath(__file__))
    on = subprocess.run([*base, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env, cwd=cwd)
    off = subprocess.run([*base, "--out", str(tmp_path / "b"), "--no-progress"], capture_output=True, text=True,
                         env=env, cwd=cwd)
    assert on.returncode == off.returncode == 0, on.stderr + off.stderr
    assert "6/6" in on.stderr and "img" in on.stderr and "<" in on.stderr, on.stderr  # count, unit, ETA
    assert "latents ->" not in off.stderr and "6/6" not in off.stderr, off.stderr
    for n in range(2):
        a, b = (np.load(tmp_path / r / f"shard_{n:05d}" / "latent.npy") for r in "ab")
        assert a.shape[0] == (4, 2)[n] and np.array_equal(a, b)


def test_flip_probability():
    """--flip-p: the fraction of flipped samples follows p (exact count under the seeded generator, within 4 binomial
    standard errors), p = data.FLIP_P is the plain --flip (same samples, same spec), and p outside (0, 1] is refused."""
    import argparse
    import run
    import train
    n = 2000
    for p in (0.25, 0.9):
        ds = data.build_dataset("embedded", resolution=8, crop="center", flip=p, seed=1, length=n)
        k = sum(int(ds[i]["phi"][2]) for i in range(n))
        assert abs(k - p * n) < 4 * (n * p * (1 - p)) ** 0.5, (p, k)
    a = data.build_dataset("embedded", resolution=8, flip=True, seed=1, length=50)
    b = data.build_dataset("embedded", resolution=8, flip=data.FLIP_P, seed=1, length=50)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(50))
    ns = argparse.Namespace
    assert run.data_flip(ns(flip=True, flip_p=data.FLIP_P)) is True
    assert run.data_flip(ns(flip=True, flip_p=0.25)) == 0.25 and run.data_flip(ns(flip=False, flip_p=0.25)) is False
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(SystemExit, match=f"--flip-p {float(bad)}"):
            train.main(["--flip-p", bad, "--max-steps", "1", "--device", "cpu", "--out-dir", "/nonexistent/x"])
