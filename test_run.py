"""
Tests of run.py (the run: presets and their precedence, the run spec, checkpoints in both formats, --init-from,
sampling from a checkpoint) and of the training CLI features that write the run's files (ema.safetensors,
--keep-every, TensorBoard events). CPU, tiny models, a few training steps each.

    HF_HUB_OFFLINE=1 python -m pytest -q test_run.py
"""
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
import run  # noqa: E402
import train  # noqa: E402
import transfer  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
# a few steps of the default job's tiny model: enough to move the weights away from their init
TINY = ["--max-steps", "4", "--global-batch", "8", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "0",
        "--no-progress", "--device", "cpu"]


def _train(out, *flags, check=True):
    """python train.py TINY flags --out-dir out, one thread; (returncode, stdout + stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "train.py", *TINY, "--out-dir", str(out), *flags], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One 4-step default-model run with the checkpoint history and TensorBoard on."""
    out = tmp_path_factory.mktemp("run") / "out"
    _train(out, "--keep-every", "2", "--tensorboard")
    return out


def _one_line(code_out):
    code, out = code_out
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert code != 0 and "Traceback" not in out, out[-2000:]
    return lines[-1]


# ----------------------------------------------------------------------------- presets: one precedence
def test_precedence_flag_recipe_scale_tiny():
    """Every setting from the first layer that has it: flag > recipe > scale > tiny, and set_by names it."""
    defaults = vars(train.get_parser().parse_args([]))
    s, by = run.resolve_settings(defaults, {"size": "XL", "lr": 3e-4})
    assert (s["lr"], by["lr"]) == (3e-4, "flag")  # flag over the scale's 1e-3
    assert (s["arch"], by["arch"]) == ("mmdit", "recipe")
    assert (s["global_batch"], by["global_batch"]) == (run.PAPER_BATCH[256], "scale")
    assert (s["crop"], by["crop"]) == (run.PAPER_CROP, "scale") == ("global", "scale")
    assert (s["sample_cfg"], by["sample_cfg"]) == (defaults["sample_cfg"], "tiny")
    s, by = run.resolve_settings(defaults, {"size": "XL", "resolution": 512})
    assert (s["global_batch"], s["crop"]) == (run.PAPER_BATCH[512], "global")  # fine-tuning above 256: global crops
    s, by = run.resolve_settings(defaults, {})  # the tiny job: ours with its deviations
    assert (s["objective"], by["objective"]) == (run.TINY_RECIPE["objective"], "recipe")
    s, _ = run.resolve_settings(defaults, {"tiny_recipe": False})
    assert s["objective"] == run.RECIPES["ours"]["objective"]


def test_print_config_says_who_set_each_value(capsys):
    train.main(["--size", "XL", "--lr", "5e-4", "--print-config"])
    cfg = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(cfg) == {"spec", "args", "set_by"} and set(cfg["set_by"]) == set(cfg["args"])
    assert cfg["set_by"]["lr"] == "flag" and cfg["args"]["lr"] == 5e-4
    assert cfg["set_by"]["vae"] == "scale" and cfg["set_by"]["arch"] == "recipe"
    assert cfg["set_by"]["seed"] == "tiny"


def test_help_defaults_come_from_the_tables():
    """Help states each layered default from the tables it is read from (it cannot drift from them)."""
    text = " ".join(train.get_parser().format_help().split())
    assert f"S/B/L/XL: {run.PAPER_SCALE['lr']}" in text
    assert f"{run.PAPER_BATCH[512]} at 512 px" in text
    assert "--recipe ours mmdit, sd3 mmdit, sdxl unet, dit dit, dit-att mmdit, mdt mdt, pixart pixart" in text


# ----------------------------------------------------------------------------- checkpoints
def test_safetensors_roundtrip(tiny_run):
    """ema.safetensors holds the EMA weights and the run spec; sampling from it equals sampling from ckpt.pt."""
    ck = run.read_checkpoint(str(tiny_run / "ckpt.pt"))
    st = run.read_checkpoint(str(tiny_run / run.EMA_FILE))
    assert st["spec"] == ck["spec"] and st["step"] == ck["step"] == 4 and st["args"] == ck["args"]
    assert set(st["ema"]) == set(ck["ema"]) and all(torch.equal(st["ema"][k], ck["ema"][k]) for k in ck["ema"])
    imgs = []
    for path in (tiny_run / "ckpt.pt", tiny_run / run.EMA_FILE):
        model, c = run.load_checkpoint(str(path))
        imgs.append(run.generate(model, c["spec"], seeds=[0, 1], labels=[3, 7], steps=4, cfg=2.0))
    assert torch.equal(imgs[0], imgs[1])
    with pytest.raises(SystemExit, match="EMA weights only"):
        run.load_checkpoint(str(tiny_run / run.EMA_FILE), ema=False)


def test_safetensors_without_spec_is_one_line(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SystemExit, match="without the run spec.*--ckpt"):
        run.read_checkpoint(str(tmp_path / "other.safetensors"))


def test_keep_every_keeps_step_named_checkpoints(tiny_run):
    kept = sorted(p.name for p in tiny_run.glob("ckpt_*.pt"))
    assert kept == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
    a = run.read_checkpoint(str(tiny_run / "ckpt_0000002.pt"))
    b = run.read_checkpoint(str(tiny_run / "ckpt.pt"))
    assert (a["step"], b["step"]) == (2, 4)  # the history is not overwritten by later checkpoints
    assert not all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_tensorboard_events(tiny_run):
    """The event file holds the named scalars at the logged steps and the sample grids' images (none here)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tiny_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss", "lr", "grad_norm", "img_per_s", "mem_gb", "loss_t/0", "loss_t/3"):
        assert tag in tags, tags
    logged = [json.loads(line) for line in open(tiny_run / "log.jsonl")]
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [r["step"] for r in logged] == [2, 4]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in logged], rel=1e-6)  # float32 in events


def test_grids_go_to_tensorboard(tmp_path):
    out = tmp_path / "out"
    _train(out, "--tensorboard", "--max-steps", "2", "--sample-every", "2", "--sample-steps", "2")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert "samples" in acc.Tags()["images"] or any(t.startswith("samples") for t in acc.Tags()["images"])


# ----------------------------------------------------------------------------- bad flags: one line, nothing written
@pytest.mark.parametrize("flags, names", [
    (["--size", "S"], ["--size S", "--data"]),  # full size without a data source
    (["--grad-accum", "3"], ["--grad-accum", "8"]),  # 8 images cannot split into 3 micro-steps
    (["--keep-every", "3"], ["--keep-every 3", "--ckpt-every 2"]),
    (["--wandb"], ["--wandb", "pip install wandb"]),
])
def test_bad_run_flags_one_line(tmp_path, flags, names):
    pytest.importorskip("torch")
    if flags == ["--wandb"]:
        try:
            import wandb  # noqa: F401
            pytest.skip("wandb is installed here")
        except ImportError:
            pass
    out = tmp_path / "out"
    line = _one_line(_train(out, *flags, check=False))
    assert all(n in line for n in names), line
    assert not (out / "ckpt.pt").exists()


# ----------------------------------------------------------------------------- --init-from adopts the file's spec
def test_init_from_spec(tmp_path, tiny_run):
    """A transferred checkpoint fine-tunes with its own spec without repeating transfer.py's flags; a conflicting
    flag stops in one line naming it."""
    moved = tmp_path / "r24.pt"
    transfer.main(["--ckpt", str(tiny_run / "ckpt.pt"), "--resolution", "24", "--out", str(moved)])
    src = run.read_checkpoint(str(moved))
    out = tmp_path / "ft"
    _train(out, "--init-from", str(moved), "--max-steps", "2")
    spec = run.read_checkpoint(str(out / "ckpt.pt"))["spec"]
    assert run.init_conflicts(src["spec"], spec) == []
    assert spec["data"]["resolution"] == 24 and spec["schedule"]["scale"] == src["spec"]["schedule"]["scale"] != 1.0
    line = _one_line(_train(tmp_path / "bad", "--init-from", str(moved), "--schedule-scale", "1", check=False))
    assert "--schedule-scale" in line and "--init-from" in line, line
    assert not (tmp_path / "bad" / "ckpt.pt").exists()


def test_resolution_follows_latent_shards(tmp_path, capsys):
    """--data latents at full size without --resolution: the shards' 512 px (meta.json) sets the resolution, and with
    it the scale's batch (384) and crops (global): not 256 px's 2048 on local crops."""
    import data
    data.synthetic_latents(str(tmp_path / "lat"), n=4, resolution=512, num_classes=10, shard_size=4)
    args, by = train.parse(["--size", "XL", "--data", "latents", "--data-path", str(tmp_path / "lat")])
    assert (args.resolution, by["resolution"]) == (512, "data")
    assert (args.global_batch, args.crop) == (run.PAPER_BATCH[512], "global")
    args, by = train.parse(["--size", "XL", "--data", "latents", "--data-path", str(tmp_path / "lat"),
                            "--global-batch", "64"])
    assert (args.global_batch, by["global_batch"]) == (64, "flag")


# ----------------------------------------------------------------------------- one preset per Tab. 1 row
# recipe -> (its Tab. A1 column, the paper's parameters in M for class / text (Tab. A1), settings of its Tab. 1 / Tab. A4
# row); the rows' words are Tab. A4's (optimiser, padding, gamma_c, objective) and Tab. 1's (which architecture)
TAB1_ROWS = {
    "ours": ("mmDiT-XL/2", {"class": 679.09, "text": 791.64},
             dict(arch="mmdit", control=["crop", "size", "flip"], gamma="cosine", gamma_alpha=8.0, text_pad="noisy",
                  beta_txt=0.02, adam_betas=[0.9, 0.95], weight_decay=0.03, objective="eps", pe_grid="resample")),
    "sd3": ("mmDiT-XL/2", {"class": 679.09, "text": 791.64},
            dict(arch="mmdit", control=[], text_pad="zero", adam_betas=[0.9, 0.999], weight_decay=0.0, objective="rf")),
    "sdxl": ("UNet-SDXL", {"class": 401.75, "text": 864.31},
             dict(arch="unet", time_ids=True, control=[], text_pad="zero", adam_betas=[0.9, 0.999], weight_decay=0.0,
                  objective="eps")),
    "dit": ("DiT-XL/2", {"class": 679.09}, dict(arch="dit", class_in="adaln", objective="eps")),
    "dit-att": ("Att-DiT-XL/2", {"class": 792.44}, dict(arch="mmdit", class_in="attn", context_weights="qkv")),
    "mdt": ("mdT-XL/2", {"class": 748.07}, dict(arch="mdt", mask_ratio=0.3)),
    "pixart": ("PixArt-XL/2", {"class": 611.7, "text": 610.12}, dict(arch="pixart")),
}


@pytest.mark.parametrize("recipe", sorted(TAB1_ROWS))
def test_recipe_rows(recipe, capsys):
    """Each Tab. 1 preset at --size XL resolves to its row's settings (set by the recipe layer), and builds its Tab. A1
    column's network: parameters within 2 % of the paper's, for each conditioning the column reports."""
    column, params, row = TAB1_ROWS[recipe]
    assert set(run.RECIPES) == set(TAB1_ROWS)
    for kind, paper_m in params.items():
        flags = ["--recipe", recipe, "--size", "XL"] + (["--num-classes", "1000"] if kind == "class" else
                                                        ["--semantic", "text"])
        train.main(flags + ["--print-config"])
        cfg = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        for k, v in row.items():
            assert cfg["args"][k] == v and cfg["set_by"][k] == "recipe", (recipe, k, cfg["args"][k])
        assert cfg["args"]["crop"] == "global" and cfg["args"]["resolution"] == 256  # §3.4: global best at 256
        model_kw = dict(cfg["spec"]["model"])
        if kind == "text":  # the tower's widths come from the loaded encoder at run time: CLIP ViT-L/14's 768
            model_kw.update(text_dim=768, pooled_dim=768)
        with torch.device("meta"):
            n = sum(p.numel() for p in models.build_model(**model_kw).parameters()) / 1e6
        assert abs(n / paper_m - 1) < 0.02, f"{recipe} {kind}: {n:.2f} M vs Tab. A1 {column} {paper_m} M"
