"""Fixtures that several test files share (pytest loads this file before any test file): the fp32 tolerance
(fp32_tol), the run spec train.py resolves for an argv (train_spec, tiny_spec), train.py / sample.py run as
subprocesses (run_script, script_env, fast_flags, repo_dir), one torch thread for tiny models (one_thread), random
nudges for zero-initialised weights (randomize) and a tiny random CLIP on disk (save_tiny_clip). Each fixture hands a
test the helper defined just above it, whose name is the fixture's with a leading underscore."""
import contextlib
import json
import os
import shlex
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail at once, never retry

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import conditioning  # noqa: E402
import data  # noqa: E402
import latents  # noqa: E402
import run  # noqa: E402
import train  # noqa: E402


def _fp32_tol(values, ulps=64):
    """A tolerance from fp32 rounding of the compared values: `ulps` units in the last place of their largest
    magnitude (at least of 1). fp32 results of two codes that order their sums differently agree to a few ulps per
    operation; 64 covers a two-layer forward or a 10-step sampler, while a wrong formula differs by >= 1e-3."""
    return ulps * torch.finfo(torch.float32).eps * max(1.0, float(values.abs().max()))


@pytest.fixture(scope="session")
def fp32_tol():
    """The fp32 tolerance of the compared values (_fp32_tol)."""
    return _fp32_tol


@torch.no_grad()
def _randomize(module, std=0.05):
    """Perturb every parameter so zero-initialised layers stop hiding dead branches / bad mappings."""
    for p in module.parameters():
        p.add_(torch.randn_like(p) * std)


@pytest.fixture(scope="session")
def randomize():
    """Random nudges for every parameter of a module (_randomize)."""
    return _randomize


_REPO_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def repo_dir():
    """The repository folder: the scripts and README.md are there."""
    return _REPO_DIR


# a tiny, fast run: 16 px, patch 4 (16 tokens), batch 4; periodic grids effectively off (2 DDIM steps at the end)
_FAST_FLAGS = ["--resolution", "16", "--patch-size", "4", "--global-batch", "4", "--warmup", "2", "--log-every", "1",
               "--sample-every", "1000", "--sample-steps", "2", "--no-progress"]


@pytest.fixture(scope="session")
def fast_flags():
    """train.py flags of a tiny, fast run (_FAST_FLAGS)."""
    return _FAST_FLAGS


@contextlib.contextmanager
def _one_thread():
    """Tiny models run fastest on one thread, and 2 threads on a busy 2-core box can be 100x slower (spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def one_thread():
    """A context manager running torch on one thread (_one_thread)."""
    return _one_thread


def _script_env(threads=1):
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")


@pytest.fixture(scope="session")
def script_env():
    """The environment of a script run by a test (_script_env)."""
    return _script_env


def _run_script(args, cwd=_REPO_DIR, launcher=None, timeout=300):
    cmd = (launcher or [sys.executable]) + args
    r = subprocess.run(cmd, cwd=cwd, env=_script_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{shlex.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="session")
def run_script():
    """Runs a script to success, returns its stdout (_run_script)."""
    return _run_script


def _train_spec(argv=()):
    """(args, run spec) that train.py resolves for argv, without training."""
    args = train.parse_args(list(argv))
    ds = data.build_dataset(args.data, args.data_path, resolution=args.resolution, crop=args.crop, seed=args.seed)
    vae = latents.get_vae(args.vae) if args.vae != "none" and args.data != "latents" else None
    enc = conditioning.get_text_encoder(args.text_encoder, args.text_encoder_path) if args.semantic == "text" else None
    return args, run.resolve_spec(args, ds, vae, enc, train.explicit_flags(list(argv)))


@pytest.fixture(scope="session")
def train_spec():
    """(args, run spec) train.py resolves for an argv (_train_spec)."""
    return _train_spec


def _tiny_spec(argv=()):
    """The run spec of train.py's defaults (tiny 'ours' mmDiT, embedded data) + argv, as a checkpoint carries it."""
    return _train_spec(["--device", "cpu", *argv])[1]


@pytest.fixture(scope="session")
def tiny_spec():
    """The run spec of train.py's defaults plus an argv (_tiny_spec)."""
    return _tiny_spec


def _save_tiny_clip(root, name, out):
    """A seeded random 1-layer open_clip model registered as `name` (its config in root), saved to out: the
    CLIPScore network of the offline tests."""
    cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(root / f"{name}.json"))
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(name).state_dict()}, out)


@pytest.fixture(scope="session")
def save_tiny_clip():
    """Registers and saves a seeded tiny random CLIP (_save_tiny_clip)."""
    return _save_tiny_clip
