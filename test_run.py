"""Tests of run.py: `.venv/bin/python -m pytest -q test_run.py` (CPU, tiny models, a few training steps each). The
presets and their precedence (flag > recipe row > scale > tiny) and --print-config; --size XL resolving to the
paper's run at 256 and 512 px, and the recipe rows' sizes; the run spec (the schedule it holds and generate sampling
as the run trained, --width / --depth); checkpoints in both formats, written atomically, and --init-from; the
evaluation default of β; the memory plan's activation count; and the training CLI features that write the run's files
(ema.safetensors, --keep-every, TensorBoard events)."""
import contextlib
import io
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402
import data  # noqa: E402
import latents  # noqa: E402
import diffusion  # noqa: E402
import models  # noqa: E402
import run  # noqa: E402
import train  # noqa: E402
import transfer  # noqa: E402
from diffusion import T  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
# a few steps of the default job's tiny model: enough to move the weights away from their init
TINY = ["--max-steps", "4", "--global-batch", "8", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "0",
        "--no-progress", "--device", "cpu"]


def _train(out, *flags, check=True, pythonpath=None):
    """python train.py TINY flags --out-dir out, one thread; (returncode, stdout + stderr). pythonpath: a folder
    searched before the installed packages."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
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
    hide = None
    if flags == ["--wandb"]:  # wandb absent whether or not it is installed: a package that fails to import
        hide = tmp_path / "no_wandb"
        (hide / "wandb").mkdir(parents=True)
        (hide / "wandb" / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    out = tmp_path / "out"
    line = _one_line(_train(out, *flags, check=False, pythonpath=hide))
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
    latents.synthetic_latents(str(tmp_path / "lat"), n=4, resolution=512, num_classes=10, shard_size=4)
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


# ----------------------------------------------------------------------------- checkpoints; the spec's schedule, size

def test_atomic_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = str(tmp_path / "ckpt.pt")
    good = {"step": 1, "w": torch.randn(4)}
    run.save_checkpoint(good, path)

    def crash(*_):  # the process dies after writing the temp file, before the rename
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()

    real_save = torch.save

    def half_write(obj, f):  # the process dies in the middle of writing
        real_save(obj, f)
        f.truncate(10)
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint({"step": 3, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    ck = torch.load(path, weights_only=False)
    assert ck["step"] == 1 and torch.equal(ck["w"], good["w"])
    run.save_checkpoint({"step": 4, "w": torch.ones(4)}, path)  # and the next good write replaces it
    assert torch.load(path, weights_only=False)["step"] == 4


def test_objective_flags_travel(train_spec):
    # train.py's diffusion flags: defaults are today's eps-DDPM, --recipe sd3 is rectified flow with logit-normal t
    # (explicit flags win), impossible combinations are refused, the run spec's schedule entry holds them all, and
    # run.generate samples as the run trained.
    a = vars(train.parse_args(["--no-tiny-recipe"]))  # the paper's recipe (Tab. A4) at tiny size
    assert diffusion.schedule_spec(a) == {**diffusion.SCHEDULE_DEFAULTS, "t_density": "uniform"}
    assert (a["objective"], a["class_in"]) == ("eps", "attn")
    a = vars(train.parse_args([]))  # the tiny default: TINY_RECIPE's deviations; any explicit flag still wins
    assert (a["objective"], a["t_density"], a["class_in"]) == ("rf", "logit-normal", "adaln")
    assert vars(train.parse_args(["--class-in", "attn"]))["class_in"] == "attn"
    assert vars(train.parse_args(["--size", "S"]))["objective"] == "eps"
    sd3_args, sd3 = train_spec(["--recipe", "sd3", "--resolution", "16", "--patch-size", "4"])
    assert (sd3_args.objective, sd3_args.t_density) == ("rf", "logit-normal")
    assert sd3["schedule"] == diffusion.schedule_spec(vars(sd3_args)) and sd3["schedule"]["objective"] == "rf"
    assert vars(train.parse_args(["--recipe", "sd3", "--objective", "eps"]))["t_density"] == "uniform"
    for bad in (["--no-tiny-recipe", "--zero-snr"], ["--no-tiny-recipe", "--shift", "3"]):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            train.parse_args(bad)

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ts = []

        def forward(self, x, t, cond):
            self.ts.append(t.clone())
            return torch.zeros_like(x)

    eps_sched = {**sd3["schedule"], "objective": "eps", "t_density": "uniform"}
    for sch, first, n in [(sd3["schedule"], T, 4), (eps_sched, T - 1, 4), ({**sd3["schedule"], "shift": 3.0}, T, 4)]:
        spec, rec = {**sd3, "schedule": sch}, Recorder()
        out = run.generate(rec, spec, [0], [1], steps=n, cfg=1.0)
        assert len(rec.ts) == n and rec.ts[0].tolist() == [first], sch["objective"]
        if sch["objective"] == "rf":  # v = 0 leaves the starting noise unchanged through every Euler step
            noise = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(out[0], noise.clamp(-1, 1))
            assert rec.ts[0].dtype == torch.float32
            torch.testing.assert_close(torch.cat(rec.ts), diffusion.make_schedule(**sch).timesteps(n))


def test_width_depth_and_clip_overrides(train_spec):
    # --width / --depth replace the preset's (heads keep its head width of 16) in the run spec, and what is built
    # from the spec has them; generate(clip_x0=) overrides the spec's x0 clamping exactly as a run trained with it
    _, spec = train_spec(["--width", "96", "--depth", "2", "--resolution", "16"])
    assert spec["model"]["size"] == {"hidden": 96, "depth": 2, "heads": 6}
    m = models.build_model(**spec["model"])
    assert (len(m.blocks), m.heads, m.hidden) == (2, 6, 96)
    assert sum(p.numel() for p in m.parameters()) > sum(p.numel() for p in models.build_model(
        **{**spec["model"], "size": "tiny"}).parameters())
    assert train_spec(["--resolution", "16"])[1]["model"]["size"] == "tiny"

    class Far(torch.nn.Module):  # predicts x0 = -2 x_t, i.e. v = (x_t - x0) / s = 3 x_t / s: x0 leaves [-1, 1]
        def forward(self, x, t, cond):
            return 3 * x / (t / T).view(-1, 1, 1, 1)

    clipped = {**spec, "schedule": {**spec["schedule"], "clip_x0": True}}
    plain = run.generate(Far(), spec, [0, 1], [1, 2], steps=4, cfg=1.0)
    over = run.generate(Far(), spec, [0, 1], [1, 2], steps=4, cfg=1.0, clip_x0=True)
    torch.testing.assert_close(over, run.generate(Far(), clipped, [0, 1], [1, 2], steps=4, cfg=1.0))
    assert (over - plain).abs().max() > 0.1
    torch.testing.assert_close(run.generate(Far(), clipped, [0, 1], [1, 2], steps=4, cfg=1.0,
                                                     clip_x0=False), plain)


# ----------------------------------------------------------------------------- the paper's run by scale
# What --size XL resolves to, written out from the paper (Berrada et al. 2024), not from train.py's tables.
PAPER_RUN = {  # key: (value at 256 px, value at 512 px, where the paper says it)
    "vae": ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-ema", "§3.1: latent diffusion on the SD VAE"),
    "global_batch": (2048, 384, "§4: batch 2048 at 256, 384 at 512"),
    "lr": (1e-3, 1e-3, "§4: constant lr 10 x 10^-4; Tab. A2"),
    "adam_betas": ([0.9, 0.95], [0.9, 0.95], "Tab. A4 ours: AdamW (0.9, 0.95)"),
    "weight_decay": (0.03, 0.03, "Tab. A4 ours: weight decay 0.03"),
    "crop": ("global", "global", "§3.4 / Fig. 8c: global crops at 256 for a standalone model; local only for transfer"),
    "gamma": ("cosine", "cosine", "Tab. A4 / Eq. 1: cosine gamma_c"),
    "gamma_alpha": (8.0, 8.0, "Tab. 2a: alpha = 8"),
    "text_pad": ("noisy", "noisy", "Tab. 3: noisy replicate padding"),
    "beta_txt": (0.02, 0.02, "Tab. 3: beta_txt = 0.02"),
    "max_steps": (600_000, 600_000, "§4: 500k-1M on IN1k; Tab. 4a's IN1k pre-training is 600k"),
    "objective": ("eps", "eps", "Tab. A4 ours: target eps"),
    "arch": ("mmdit", "mmdit", "Tab. A4 ours: mmDiT++"),
    "class_in": ("attn", "attn", "Tab. A4: condition disentanglement, class through attention"),
    "control": (["crop", "size", "flip"], ["crop", "size", "flip"], "§2.1 / §3.3: crop, size and flip control"),
    "pe_grid": ("resample", "resample", "Tab. A4: resampled positional embedding"),
}


def test_paper_recipe_table():
    """--size XL resolves to the paper's run at 256 and 512 px (the table above, with its sources); --print-config
    prints the same spec and args as one JSON line without loading data; --size tiny keeps the CPU job."""
    for col, res in enumerate((256, 512)):
        a = vars(train.parse_args(["--size", "XL", "--resolution", str(res)]))
        for k, vals in PAPER_RUN.items():
            assert a[k] == vals[col], f"--size XL at {res} px: {k} = {a[k]!r}, the paper's {vals[col]!r} ({vals[2]})"
    sd3 = vars(train.parse_args(["--size", "XL", "--recipe", "sd3"]))
    assert sd3["adam_betas"] == [0.9, 0.999] and sd3["crop"] == "global"  # Tab. A4 SD3 column
    assert vars(train.parse_args(["--size", "XL", "--global-batch", "256"]))["global_batch"] == 256  # flags win
    tiny = vars(train.parse_args([]))  # the CPU job, unchanged
    assert (tiny["resolution"], tiny["vae"], tiny["lr"], tiny["global_batch"], tiny["max_steps"], tiny["crop"],
            tiny["ema_decay"], tiny["warmup"]) == (data.RESOLUTION, "none", 2e-3, 32, 2400, "global", 0.999, 100)
    argv = ["--size", "XL", "--resolution", "512", "--data", "imagefolder", "--data-path", "/does/not/exist",
            "--print-config"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        train.main(argv)  # exits before the (missing) data or the VAE would be loaded
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 1, lines
    cfg = json.loads(lines[0])
    assert cfg["args"]["global_batch"] == 384 and cfg["spec"]["data"]["resolution"] == 512
    assert cfg["spec"]["model"]["input_size"] == 64 and cfg["spec"]["model"]["in_channels"] == 4  # 512 / 8, SD VAE
    assert cfg["spec"]["latent"]["scale"] == data.VAE_SCALE and cfg["spec"]["semantic"]["num_classes"] is None


def test_eval_beta_follows_recipe():
    """Control guidance beta: 1.375 for a full-size ours checkpoint (Tab. A3), 1 for tiny and baseline runs."""
    assert run.default_beta({"recipe": "ours", "size": "XL"})[0] == 1.375
    assert run.default_beta({"recipe": "ours", "size": "tiny"})[0] == 1.0
    assert run.default_beta({"recipe": "sd3", "size": "XL"})[0] == 1.0
    assert run.default_beta({})[0] == 1.0


# ----------------------------------------------------------------------------- the memory plan's activation count
@pytest.mark.parametrize("text", [False, True])
def test_activation_count_fake_equals_real(text):
    """The memory plan counts autograd's saved bytes on fake tensors; the same forward on real tensors saves
    exactly as many bytes (a tiny latent mmDiT at 256 px), and the count grows with the batch."""
    kw = dict(arch="mmdit", size="tiny", input_size=32, in_channels=4,
              control=["crop", "size", "flip"], **(dict(text_dim=bench.TEXT_DIM, pooled_dim=bench.POOLED_DIM) if text
                                                    else dict(num_classes=10)))
    spec = {"model": kw, "latent": dict(vae="sd", scale=0.18215, channels=4, down=8), "data": {"resolution": 256}}
    counts = {}
    for B in (1, 3):
        fake, n_fake = run.saved_bytes(spec, B, fake=True)
        real, n_real = run.saved_bytes(spec, B, fake=False)
        assert (fake, n_fake) == (real, n_real), f"B={B}: fake {fake} B != real {real} B"
        counts[B] = real
    assert counts[3] > counts[1] > 0
