"""Tests of transfer.py: `.venv/bin/python -m pytest -q test_transfer.py` (CPU, a minute). Resolution transfer (the
PE grid, Eq. 3's scale, Eq. 4's guidance, for the UNet too) with the fine-tune command it prints run through
train.py, sample and evaluate; dataset transfer (class -> text, ImageNet-1k -> 22k class tables, class maps made from
folders or wnid lists, bad maps refused in one line); and the diffusers export (weights.py): a tiny random model of
each exportable architecture, saved as a train.py checkpoint, exported with `transfer.py --to-diffusers` and loaded
back with the diffusers class's from_pretrained, must compute our outputs (fp32 tolerance derived from the values,
_fp32_tol); importing the export back gives our weights bit for bit (the key maps are one mapping read in two
directions); a part a class lacks stops the export in one line and writes nothing; which train.py recipes export is
pinned by test_recipes_export."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail at once, never retry

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import conditioning  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import models  # noqa: E402
import run  # noqa: E402
import train  # noqa: E402
import transfer  # noqa: E402
import weights  # noqa: E402

TEXT = ["--semantic", "text", "--text-encoder", "tiny"]
# train.py flags of a tiny exportable model per architecture (embedded data, 16 px pixels), and build_model
# arguments train.py has no flag for. dit: diffusers' DiT port embeds t with downscale_freq_shift 1 (a DiT as
# import_diffusers builds it); pixart with the resampled PE grid, which PixArt's interpolation_scale can place.
_EXPORTABLE = {
    "dit": (["--recipe", "dit"], {"t_freq_shift": 1}),
    "pixart": (["--recipe", "sd3", "--arch", "pixart", "--pe-grid", "resample", *TEXT], {}),
    "mmdit": (["--recipe", "sd3", "--context-weights", "full", *TEXT], {}),
    "unet": (["--recipe", "dit", "--arch", "unet", *TEXT], {}),
}


def _fp32_tol(values, ulps=64):
    """`ulps` units in the last place (fp32) of the compared values' largest magnitude, at least of 1: two codes
    that order their sums differently agree to a few ulps per operation over a 4-block forward; a wrong map
    differs by about the output scale."""
    return ulps * torch.finfo(torch.float32).eps * max(1.0, float(values.abs().max()))


def _spec(argv):
    """The run spec train.py resolves for argv (embedded data, CPU), as its checkpoints carry it."""
    argv = ["--device", "cpu", *argv]
    args = train.parse_args(argv)
    ds = data.build_dataset(args.data, args.data_path, resolution=args.resolution, crop=args.crop, seed=args.seed)
    enc = conditioning.get_text_encoder(args.text_encoder, args.text_encoder_path) if args.semantic == "text" else None
    return run.resolve_spec(args, ds, None, enc, train.explicit_flags(argv))


def _ckpt(path, argv, extra=None, seed=0):
    """A train.py-layout checkpoint with random weights: "ema" and "model" differ, and every zero-initialised
    layer (adaLN-Zero, output layers) is perturbed so that no branch hides a wrong map."""
    spec = _spec(argv)
    spec["model"].update(extra or {})
    torch.manual_seed(seed)
    init = models.build_model(**spec["model"]).state_dict()
    ema, raw = ({k: v + 0.05 * torch.randn_like(v) for k, v in init.items()} for _ in range(2))
    run.save_checkpoint({"model": raw, "ema": ema, "spec": spec, "args": None, "step": 7}, str(path))
    return str(path), spec


def _ours(spec, sd):
    model = models.build_model(**spec["model"])
    model.load_state_dict(sd)
    return model.eval()


def _inputs(spec, B=3):
    """Random (x, t, cond) of the run's shape and conditioning, built here (not by the code under test)."""
    g = torch.Generator().manual_seed(1)
    C, H, _ = data.latent_shape(spec["latent"], spec["data"]["resolution"])
    x, t, sem = torch.randn(B, C, H, H, generator=g), torch.tensor([3, 480, 999][:B]), spec["semantic"]
    if sem["kind"] == "class":
        return x, t, {"y": torch.tensor([0, 4, sem["num_classes"]][:B])}  # the null id included
    return x, t, {"text": torch.randn(B, 77, sem["dim"], generator=g), "pooled": torch.randn(B, sem["pooled_dim"],
                                                                                               generator=g)}


def _theirs(ref, x, t, cond):
    """The diffusers model's output, called the way its class documents. The UNet gets random SDXL time ids: our
    text UNet has none, so the export must ignore them."""
    if isinstance(ref, diffusers.DiTTransformer2DModel):
        return ref(x, timestep=t, class_labels=cond["y"]).sample
    if isinstance(ref, diffusers.PixArtTransformer2DModel):
        return ref(x, encoder_hidden_states=cond["text"], timestep=t,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    if isinstance(ref, diffusers.SD3Transformer2DModel):
        return ref(x, encoder_hidden_states=cond["text"], pooled_projections=cond["pooled"], timestep=t).sample
    time_ids = torch.rand(len(x), 6, generator=torch.Generator().manual_seed(2)) * 1024
    return ref(x, t, encoder_hidden_states=cond["text"],
               added_cond_kwargs={"text_embeds": cond["pooled"], "time_ids": time_ids}).sample


@pytest.mark.parametrize("arch", list(_EXPORTABLE))
def test_diffusers_export(arch, tmp_path, capsys):
    argv, extra = _EXPORTABLE[arch]
    ckpt, spec = _ckpt(tmp_path / "ckpt.pt", argv, extra)
    assert spec["model"]["arch"] == arch
    out = tmp_path / "export"
    transfer.main(["--ckpt", ckpt, "--to-diffusers", str(out)])
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert "from_pretrained" in capsys.readouterr().out
    cls = getattr(diffusers, weights.DIFFUSERS_CLASSES[arch])
    ref = cls.from_pretrained(str(out)).eval()
    ck = torch.load(ckpt, weights_only=False)
    ema, raw = _ours(spec, ck["ema"]), _ours(spec, ck["model"])
    x, t, cond = _inputs(spec)
    with torch.no_grad():
        want, got, other = ema(x, t, cond), _theirs(ref, x, t, cond), raw(x, t, cond)
    err = (got - want).abs().max().item()
    print(f"{arch} -> {cls.__name__}: max |diff| {err:.3g} (outputs up to {want.abs().max().item():.3g})")
    assert want.abs().max() > 0.1 and err <= _fp32_tol(want), err  # fp32 rounding of the outputs
    assert (got - other).abs().max() > 100 * _fp32_tol(want)  # the EMA weights went out, not the raw ones
    # one mapping, two directions: importing the export gives back our weights bit for bit
    back = (weights.import_diffusers_unet(models.UNet(**weights.unet_kwargs_from_diffusers(ref.config)), ref)
            if arch == "unet" else weights.import_diffusers(ref)).state_dict()
    assert set(back) == set(ck["ema"])
    for k, v in ck["ema"].items():
        if arch == "unet" and k == "add_embedder.0.weight":  # + the zero columns of the SDXL time ids it ignores
            assert torch.equal(back[k][:, :v.shape[1]], v) and not back[k][:, v.shape[1]:].any(), k
        else:
            assert torch.equal(back[k], v), k


def test_diffusers_export_raw_weights(tmp_path):
    ckpt, spec = _ckpt(tmp_path / "ckpt.pt", *_EXPORTABLE["dit"])
    transfer.main(["--ckpt", ckpt, "--to-diffusers", str(tmp_path / "raw"), "--no-ema"])
    ref = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "raw")).eval()
    raw = _ours(spec, torch.load(ckpt, weights_only=False)["model"])
    x, t, cond = _inputs(spec)
    with torch.no_grad():
        want, got = raw(x, t, cond), _theirs(ref, x, t, cond)
    assert (got - want).abs().max() <= _fp32_tol(want)  # fp32 rounding of the outputs


def _refused(argv, out, *names):
    """transfer.main(argv) stops with a one-line message naming each of `names` and leaves `out` absent or empty."""
    existed = os.path.isdir(out)
    with pytest.raises(SystemExit) as e:
        transfer.main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg and all(n in msg for n in names), msg
    assert (os.listdir(out) == []) if existed else not os.path.exists(out), "the refusal wrote something"
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.startswith(".to_diffusers")]  # no temp folder
    return msg


def test_diffusers_export_refusals(tmp_path):
    out = str(tmp_path / "export")
    # control conditioning (the tiny default: "ours" mmDiT++), named with the flag that put it there
    ckpt, _ = _ckpt(tmp_path / "ours.pt", TEXT)
    msg = _refused(["--ckpt", ckpt, "--to-diffusers", out], out, "--control crop size flip", "control conditioning",
                   "SD3Transformer2DModel")
    assert msg.startswith("transfer.py --to-diffusers: mmdit with ")
    # Att-DiT: the class token joins the image tokens in attention; an existing empty folder stays empty
    os.makedirs(out)
    ckpt, _ = _ckpt(tmp_path / "attn.pt", ["--recipe", "dit", "--class-in", "attn"], {"t_freq_shift": 1})
    _refused(["--ckpt", ckpt, "--to-diffusers", out], out, "--class-in attn", "class token in attention",
             "DiTTransformer2DModel")
    # a PE grid the class cannot place: SD3's grid steps by base / max_size from a centre crop, not linspace
    ckpt, _ = _ckpt(tmp_path / "res.pt", ["--recipe", "sd3", "--pe-grid", "resample", *TEXT])
    _refused(["--ckpt", ckpt, "--to-diffusers", out], out, "--pe-grid resample", "PE grid")
    ckpt, _ = _ckpt(tmp_path / "mdt.pt", ["--recipe", "dit", "--arch", "mdt"])
    _refused(["--ckpt", ckpt, "--to-diffusers", out], out, "mdt has no diffusers counterpart")
    # bad command lines: a non-empty target, transfer flags with the export, --no-ema without it, no --ckpt
    ckpt, _ = _ckpt(tmp_path / "dit.pt", *_EXPORTABLE["dit"])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="not an empty folder"):
        transfer.main(["--ckpt", ckpt, "--to-diffusers", str(full)])
    assert os.listdir(full) == ["keep.txt"]
    _refused(["--ckpt", ckpt, "--to-diffusers", out, "--resolution", "32"], out, "--resolution", "as it is")
    _refused(["--ckpt", ckpt, "--to-diffusers", out, "--out", "x.pt"], out, "--out")
    _refused(["--to-diffusers", out], out, "--ckpt")
    _refused(["--ckpt", str(tmp_path / "none.pt"), "--to-diffusers", out], out, "none.pt", "--ckpt")
    with pytest.raises(SystemExit, match="--no-ema only goes with --to-diffusers"):
        transfer.main(["--ckpt", ckpt, "--resolution", "32", "--out", str(tmp_path / "t.pt"), "--no-ema"])


# what each train.py recipe (and the tiny default's deviations, TINY_RECIPE) exports to, or the parts that stop it
_RECIPES = [
    ([], ["control conditioning", "class labels", "PE grid"]),  # ours + TINY_RECIPE (the CPU default)
    (["--no-tiny-recipe"], ["control conditioning", "class labels", "a context stream", "PE grid"]),  # ours as Tab. A4
    ([*TEXT], ["control conditioning", "PE grid"]),  # ours, text
    (["--recipe", "sd3"], ["class labels", "a context stream"]),
    (["--recipe", "sd3", *TEXT], ["a context stream"]),  # text with q/k/v of its own (Tab. A1); --context-weights full exports
    (["--recipe", "dit"], ["timestep frequencies"]),
]


@pytest.mark.parametrize("argv,parts", _RECIPES, ids=[" ".join(a) or "default" for a, _ in _RECIPES])
def test_recipes_export(argv, parts):
    spec = _spec(argv)
    model = models.build_model(**spec["model"])
    found = [p for _, p in weights.export_blockers(model, spec)]
    assert len(found) == len(parts) and all(f.startswith(p) for f, p in zip(found, parts)), found


# ----------------------------------------------------------------------------- resolution and dataset transfer

def test_transfer_resolution(tmp_path, capsys):
    torch.manual_seed(0)
    common = ["--device", "cpu", "--global-batch", "2", "--no-progress", "--sample-steps", "1", "--log-every", "1"]
    train.main(common + ["--max-steps", "2", "--resolution", "32", "--out-dir", str(tmp_path / "r32")])  # tiny, 32 px
    src = str(tmp_path / "r32" / "ckpt.pt")
    transfer.main(["--ckpt", src, "--resolution", "64", "--out", str(tmp_path / "t64.pt")])
    ck = torch.load(tmp_path / "t64.pt", weights_only=False)
    a = ck["spec"]
    assert a["data"]["resolution"] == 64 and a["schedule"]["scale"] == 2.0
    assert a["model"]["pe_grid"] == "resample" and a["model"]["pe_base"] == 16 and a["model"]["input_size"] == 64
    assert ck["transfer"]["guidance_lam"] == 2.0  # Eq. 4: 1.5 at the pre-training resolution -> 2.0 at 2x
    r = ck["transfer"]["reports"]["resolution"]
    assert not r["reinitialised"] and not r["dropped"] and len(r["kept"]) == len(ck["ema"])
    m32, _ = run.load_checkpoint(src)
    m64, _ = run.load_checkpoint(str(tmp_path / "t64.pt"))
    for k, v in m32.state_dict().items():  # every weight moves unchanged (the PE is computed, not stored)
        assert torch.equal(v, m64.state_dict()[k]), k
    # resampled PE at 64 px (32 patches) spans the 32-px range [0, 16]; extrapolation would reach 31
    g32, g64 = m32.x_embedder.axis(16), m64.x_embedder.axis(32)
    assert len(g64) == 32 and g64[0] == g32[0] == 0 and g64[-1] == g32[-1] == 16
    flags = capsys.readouterr().out.split("--init-from")[-1].split()[1:-2]  # the flags transfer.py prints
    assert flags == ["--resolution", "64", "--pe-base", "16", "--schedule-scale", "2", "--base-resolution", "32"]
    # fine-tune at 64 from the transferred checkpoint, then sample at 64
    train.main(common + ["--max-steps", "1", "--out-dir", str(tmp_path / "r64"), "--init-from",
                         str(tmp_path / "t64.pt")] + flags)
    assert "missing []" in capsys.readouterr().out  # every weight of the 64-px model came from the transfer
    model, ck64 = run.load_checkpoint(str(tmp_path / "r64" / "ckpt.pt"))
    a64 = ck64["spec"]
    assert a64["schedule"]["scale"] == 2.0 and a64["data"]["resolution"] == 64
    assert a64["model"] == a["model"], "the fine-tuning run rebuilds exactly the transferred model"
    imgs = run.generate(model, a64, [0, 1], [0, 5], steps=2, cfg=2.0)
    assert imgs.shape == (2, 3, 64, 64) and torch.isfinite(imgs).all()
    # evaluate.py's generation path: guidance law default 2.0 at 2x the pre-training resolution, files by seed
    evaluate.main(["--ckpt", str(tmp_path / "r64" / "ckpt.pt"), "--num-samples", "3", "--steps", "2", "--no-fid"])
    out = tmp_path / "r64" / "ckpt_samples_n3_steps2_lam2_beta1_train"
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png"]
    assert json.load(open(str(out) + "_eval.json"))["lam"] == 2.0


def test_transfer_resolution_unet_guidance_law(tmp_path, capsys, train_spec):
    """Regression: Eq. 4 holds for the UNet too (no PE grid to read the pre-training resolution from): lam 1.5 -> 2.0 at 2x,
    in transfer.py's record and in evaluate.py's default for the fine-tuning run the printed flags describe."""
    torch.manual_seed(0)
    pre = ["--arch", "unet", "--resolution", "32"]
    args, spec = train_spec(pre)
    assert run.default_lam(spec) == 1.5
    sd = models.build_model(**spec["model"]).state_dict()
    torch.save({"ema": sd, "model": sd, "spec": spec, "args": vars(args), "step": 3}, tmp_path / "u32.pt")
    transfer.main(["--ckpt", str(tmp_path / "u32.pt"), "--resolution", "64", "--out", str(tmp_path / "u64.pt")])
    ck = torch.load(tmp_path / "u64.pt", weights_only=False)
    assert ck["transfer"]["guidance_lam"] == ck["transfer"]["reports"]["resolution"]["guidance_lam"] == 2.0
    assert run.default_lam(ck["spec"]) == 2.0
    flags = capsys.readouterr().out.split("--init-from")[-1].split()[1:-2]  # the flags transfer.py prints
    _, spec64 = train_spec(pre + flags)  # the fine-tuning run's spec
    assert spec64["data"]["resolution"] == 64 and run.default_lam(spec64) == 2.0
    assert spec64["model"] == ck["spec"]["model"]


def test_transfer_dataset(tmp_path, tiny_spec):
    torch.manual_seed(0)
    a = tiny_spec()
    sd = models.build_model(**a["model"]).state_dict()
    with torch.no_grad():  # "pre-trained" weights: anything but the init values
        sd = {k: v + torch.randn_like(v) for k, v in sd.items()}
    # class -> text: every backbone tensor bit-identical, the semantic embedder replaced, the class table dropped
    b, new, rep, flags = transfer.transfer_to_text(a, sd, text_encoder="tiny")
    assert b["semantic"]["kind"] == "text" and "num_classes" not in b["model"]
    assert rep["dropped"] == [transfer.TABLE]
    text_keys = sorted(k for k in new if k.startswith(("context_embedder", "pooled_embedder")))
    assert sorted(rep["reinitialised"]) == text_keys
    assert len(rep["reinitialised"]) > 0 and set(rep["kept"]) == set(sd) - {transfer.TABLE}
    for k in rep["kept"]:
        assert torch.equal(new[k], sd[k]), k
    model = models.build_model(**b["model"])
    model.load_state_dict(new)  # strict: the report covers every key of the text model
    # ImageNet-1k -> 22k: the table grows, old rows move by the class map, the null row moves to the end
    cmap = [2 * i for i in range(10)]
    b, new, rep, flags = transfer.transfer_classes(a, sd, 25, cmap)
    assert flags == {"--num-classes": 25}
    t_old, t_new = sd[transfer.TABLE], new[transfer.TABLE]
    assert t_new.shape == (26, t_old.shape[1])
    assert torch.equal(t_new[cmap], t_old[:10]) and torch.equal(t_new[25], t_old[10])
    assert rep["reinitialised"] == [f"{transfer.TABLE}[15 new class rows]"] and not rep["dropped"]
    assert all(torch.equal(new[k], sd[k]) for k in sd if k != transfer.TABLE)
    # the CLI writes a checkpoint that sample.py / evaluate.py / train.py --init-from load as is
    torch.save({"ema": sd, "model": sd, "spec": a, "step": 7}, tmp_path / "c.pt")
    transfer.main(["--ckpt", str(tmp_path / "c.pt"), "--num-classes", "25", "--out", str(tmp_path / "c22k.pt")])
    m, ck22 = run.load_checkpoint(str(tmp_path / "c22k.pt"))
    assert ck22["spec"]["semantic"]["num_classes"] == 25 and m.y_embedder.embedding_table.weight.shape[0] == 26


# ----------------------------------------------------------------------------- ImageNet-1k -> 22k class maps (transfer.py --make-class-map)
# 10 old wnids (the embedded dataset's 10 classes stand for them), written in unsorted order on purpose
_MAP_OLD = ["n03000134", "n01440764", "n09999999", "n02102040", "n01443537",
       "n04000000", "n02979186", "n03028079", "n03394916", "n03417042"]
_MAP_EXTRA = ["n00000001", "n01440000", "n02000000", "n03000000", "n03400000", "n09999998"]  # interleave when sorted


def _folder_tree(root, wnids):
    """ImageNet layout root/<wnid>/0.png, one 4x4 PNG per class."""
    for i, w in enumerate(wnids):
        os.makedirs(os.path.join(root, w))
        img = np.full((4, 4, 3), i * 15, dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(root, w, "0.png"))
    return str(root)


def _tiny_ckpt(path):
    """A class checkpoint of train.py's default tiny model (embedded data: 10 classes) with non-init weights."""
    argv = ["--device", "cpu"]
    args = train.parse_args(argv)
    ds = data.build_dataset(args.data, args.data_path, resolution=args.resolution, crop=args.crop, seed=args.seed)
    spec = run.resolve_spec(args, ds, None, None, train.explicit_flags(argv))
    torch.manual_seed(0)
    sd = {k: v + torch.randn_like(v) for k, v in models.build_model(**spec["model"]).state_dict().items()}
    torch.save({"ema": sd, "model": sd, "spec": spec, "step": 3}, path)
    return str(path), sd


def _one_line_exit(argv, *names):
    """transfer.main(argv) must stop with a one-line message that names each of `names`."""
    with pytest.raises(SystemExit) as e:
        transfer.main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg and all(n in msg for n in names), msg
    return msg


def test_make_class_map_folders_and_wnid_list(tmp_path, capsys):
    old = _folder_tree(tmp_path / "in1k", _MAP_OLD)
    new = _folder_tree(tmp_path / "in22k", _MAP_OLD + _MAP_EXTRA)
    # folder ids are data.ImageFolderDataset's: sorted folder names
    assert transfer.read_class_names(old, "--old-classes") == data.ImageFolderDataset(old).classes == sorted(_MAP_OLD)
    out = tmp_path / "maps" / "in1k_to_in22k.json"
    transfer.main(["--make-class-map", "--old-classes", old, "--new-classes", new, "--out", str(out)])
    # sorted(_MAP_OLD + _MAP_EXTRA) = n00000001 n01440000 n01440764 n01443537 n02000000 n02102040 n02979186 n03000000
    #                       n03000134 n03028079 n03394916 n03400000 n03417042 n04000000 n09999998 n09999999
    assert json.loads(out.read_text()) == [2, 3, 5, 6, 8, 9, 10, 12, 13, 15]
    line = capsys.readouterr().out.splitlines()[0]
    assert "10 old classes" in line and "16 new classes" in line and str(out) in line
    # a wnid list keeps its own line order (ImageNet-21k's release order); extra words per line are ignored
    txt = tmp_path / "wnids.txt"
    txt.write_text("".join(f"{w} some words\n" for w in _MAP_EXTRA[:3] + _MAP_OLD[::-1] + _MAP_EXTRA[3:]) + "\n")
    transfer.main(["--make-class-map", "--old-classes", old, "--new-classes", str(txt), "--out", str(out)])
    order = _MAP_EXTRA[:3] + _MAP_OLD[::-1] + _MAP_EXTRA[3:]
    assert json.loads(out.read_text()) == [order.index(w) for w in sorted(_MAP_OLD)]


def test_transfer_with_made_class_map(tmp_path, capsys):
    ckpt, sd = _tiny_ckpt(tmp_path / "c.pt")
    old = tmp_path / "old.txt"
    old.write_text("\n".join(_MAP_OLD))  # the checkpoint's class ids in list order
    new = _folder_tree(tmp_path / "in22k", _MAP_OLD + _MAP_EXTRA)
    cmap_path = tmp_path / "map.json"
    transfer.main(["--make-class-map", "--old-classes", str(old), "--new-classes", new, "--out", str(cmap_path)])
    cmap = json.loads(cmap_path.read_text())
    assert cmap == [sorted(_MAP_OLD + _MAP_EXTRA).index(w) for w in _MAP_OLD]
    out = tmp_path / "c22k.pt"
    transfer.main(["--ckpt", ckpt, "--num-classes", "16", "--class-map", str(cmap_path), "--out", str(out)])
    m, ck = run.load_checkpoint(str(out))
    t_old, t_new = sd[transfer.TABLE], ck["ema"][transfer.TABLE]  # (11, D), (17, D)
    assert t_new.shape == (17, t_old.shape[1]) and ck["spec"]["semantic"]["null_id"] == 16
    assert torch.equal(t_new[cmap], t_old[:10])  # old class i lands on row cmap[i]
    assert torch.equal(t_new[16], t_old[10])  # the null row moves to the end
    assert all(torch.equal(ck["ema"][k], sd[k]) for k in sd if k != transfer.TABLE)


def test_make_class_map_missing_wnid(tmp_path):
    old = _folder_tree(tmp_path / "in1k", _MAP_OLD)
    new = tmp_path / "wnids.txt"
    new.write_text("\n".join(_MAP_OLD[2:] + _MAP_EXTRA))  # _MAP_OLD[0], _MAP_OLD[1] are not in the new list
    out = tmp_path / "map.json"
    msg = _one_line_exit(["--make-class-map", "--old-classes", old, "--new-classes", str(new), "--out", str(out)],
                         "--new-classes", str(new), "2 of the 10", _MAP_OLD[1])
    assert _MAP_OLD[0] in msg and not out.exists()
    _one_line_exit(["--make-class-map", "--old-classes", str(tmp_path / "nope"), "--new-classes", str(new),
                    "--out", str(out)], "--old-classes", "nope")
    assert not out.exists() and not os.path.exists(str(out) + ".tmp")


@pytest.mark.parametrize("bad, words", [
    (list(range(9)), "9 entries"),  # short: one old class would be lost
    (list(range(11)), "11 entries"),  # long
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 16], "outside"),  # id >= --num-classes
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, -1], "outside"),  # negative would wrap around
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 1], "both map to new id 1"),  # duplicate target
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9.5], "not an integer"),
    ({"n01440764": 0}, "JSON list"),
])
def test_bad_class_map(tmp_path, bad, words):
    ckpt, _ = _tiny_ckpt(tmp_path / "c.pt")
    cmap = tmp_path / "bad.json"
    cmap.write_text(json.dumps(bad))
    out = tmp_path / "c22k.pt"
    _one_line_exit(["--ckpt", ckpt, "--num-classes", "16", "--class-map", str(cmap), "--out", str(out)],
                   "--class-map", str(cmap), words)
    assert not out.exists() and not os.path.exists(str(out) + ".tmp")  # nothing written


def test_bad_class_map_file(tmp_path):
    ckpt, _ = _tiny_ckpt(tmp_path / "c.pt")
    out = tmp_path / "c22k.pt"
    for path, words in ((tmp_path / "none.json", "not found"), (tmp_path / "bad.json", "not JSON")):
        if words == "not JSON":
            path.write_text("[0, 1,")
        _one_line_exit(["--ckpt", ckpt, "--num-classes", "16", "--class-map", str(path), "--out", str(out)],
                       "--class-map", str(path), words)
    _one_line_exit(["--ckpt", ckpt, "--class-map", str(tmp_path / "bad.json"), "--out", str(out)],
                   "--class-map", "--num-classes")
    _one_line_exit(["--ckpt", ckpt, "--num-classes", "5", "--out", str(out)], "--num-classes 5", "--class-map")
    assert not out.exists()
