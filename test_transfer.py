"""Tests of transfer.py's diffusers export: `python -m pytest -q test_transfer.py` (CPU, seconds).

A tiny random model of each exportable architecture is saved as a train.py checkpoint, exported with
`transfer.py --to-diffusers`, loaded back with the diffusers class's from_pretrained, and must compute our outputs
(fp32 tolerance derived from the values, _fp32_tol). Importing the export back must give our weights bit for bit
(the key maps are one mapping read in two directions). A part a class lacks stops the export in one line and
writes nothing; which train.py recipes export is pinned by test_recipes_export.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail at once, never retry

import diffusers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import conditioning  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
import transfer  # noqa: E402

TEXT = ["--semantic", "text", "--text-encoder", "tiny"]
# train.py flags of a tiny exportable model per architecture (embedded data, 16 px pixels), and build_model
# arguments train.py has no flag for. dit: diffusers' DiT port embeds t with downscale_freq_shift 1 (a DiT as
# import_diffusers builds it); pixart with the resampled PE grid, which PixArt's interpolation_scale can place.
_EXPORTABLE = {
    "dit": (["--recipe", "dit"], {"t_freq_shift": 1}),
    "pixart": (["--recipe", "sd3", "--arch", "pixart", "--pe-grid", "resample", *TEXT], {}),
    "mmdit": (["--recipe", "sd3", *TEXT], {}),
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
    return train.resolve_spec(args, ds, None, enc, train.explicit_flags(argv))


def _ckpt(path, argv, extra=None, seed=0):
    """A train.py-layout checkpoint with random weights: "ema" and "model" differ, and every zero-initialised
    layer (adaLN-Zero, output layers) is perturbed so that no branch hides a wrong map."""
    spec = _spec(argv)
    spec["model"].update(extra or {})
    torch.manual_seed(seed)
    init = models.build_model(**spec["model"]).state_dict()
    ema, raw = ({k: v + 0.05 * torch.randn_like(v) for k, v in init.items()} for _ in range(2))
    models.save_checkpoint({"model": raw, "ema": ema, "spec": spec, "args": None, "step": 7}, str(path))
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
    cls = getattr(diffusers, transfer.DIFFUSERS_CLASSES[arch])
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
    back = (transfer.import_diffusers_unet(models.UNet(**transfer.unet_kwargs_from_diffusers(ref.config)), ref)
            if arch == "unet" else transfer.import_diffusers(ref)).state_dict()
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
    (["--no-tiny-recipe"], ["control conditioning", "class labels", "PE grid"]),  # ours as Tab. A4
    ([*TEXT], ["control conditioning", "PE grid"]),  # ours, text
    (["--recipe", "sd3"], ["class labels"]),
    (["--recipe", "sd3", *TEXT], []),
    (["--recipe", "dit"], ["timestep frequencies"]),
]


@pytest.mark.parametrize("argv,parts", _RECIPES, ids=[" ".join(a) or "default" for a, _ in _RECIPES])
def test_recipes_export(argv, parts):
    spec = _spec(argv)
    model = models.build_model(**spec["model"])
    found = [p for _, p in transfer.export_blockers(model, spec)]
    assert len(found) == len(parts) and all(f.startswith(p) for f, p in zip(found, parts)), found
