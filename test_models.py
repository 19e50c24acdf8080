"""Tests of models.py: `.venv/bin/python -m pytest -q test_models.py` (CPU, a minute). Every denoiser against its
diffusers counterpart on tiny random weights (DiT, PixArt-α, SD3's mmDiT, the SDXL and SD 1.x UNets), rebuilt from
its run spec alone; zero-initialised outputs and a gradient for every parameter in every conditioning mode; the
resampled PE grid; mDT-v2's masking (training only, drawn from its generator, the unmasked pass trained too); the
original DiT layout's import (weights.py, as the diffusers imports); every cell of the paper's Tab. A1 (params,
GFLOPs at 256 and 512 px, class and text rows) against the models tab_a1_model builds, counted on the meta device,
and the meta count against a real one; the context-stream options of MMDiT against what they claim to be (DiT w/ Att,
shared weights)."""
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail at once, never retry

import pytest  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402
import diffusion  # noqa: E402
import models  # noqa: E402
import run  # noqa: E402
import weights  # noqa: E402
from diffusion import Schedule  # noqa: E402
from models import UNET_SIZES, UNet  # noqa: E402
from weights import import_diffusers_unet, unet_kwargs_from_diffusers  # noqa: E402

# Paper Tab. A1 as printed: (column, cond) -> (params M, GFLOPs @256, GFLOPs @512); the text row's four numbers are
# UNet, PixArt, mmDiT, Att-DiT.
PAPER = {
    ("UNet-SDXL", "class"): (401.75, 95.38, 390), ("UNet-SDXL", "text"): (864.31, 189.78, 819.56),
    ("PixArt-XL/2", "class"): (611.7, 275.14, 1200), ("PixArt-XL/2", "text"): (610.12, 314.68, 1140),
    ("mmDiT-XL/2", "class"): (679.09, 237.93, 1050), ("mmDiT-XL/2", "text"): (791.64, 397.06, 1260),
    ("Att-DiT-XL/2", "class"): (792.44, 237.93, 1050), ("Att-DiT-XL/2", "text"): (940.49, 407.88, 1500),
    ("mdT-XL/2", "class"): (748.07, 259.08, 1140), ("DiT-XL/2", "class"): (679.09, 237.4, 1050),
}
KEYS = ("params", "gflops_256", "gflops_512")
TOL = 0.02  # the target: every cell within 2 % of the paper


def _fp32_tol(values, ulps=64):
    """A tolerance from fp32 rounding of the compared values: `ulps` units in the last place of their largest
    magnitude (at least of 1); two codes that order their sums differently agree to a few ulps per operation,
    while a wrong formula or a mis-mapped weight differs by >= 1e-3."""
    return ulps * torch.finfo(torch.float32).eps * max(1.0, float(values.abs().max()))
# Cells no configuration consistent with the other cells meets (RESULTS.md, "Tab. A1, cell by cell"): the number
# our model of that cell measures, to 0.01. A change that moves one fails here; one that brings it within 2 % too.
EXCEPTIONS = {
    ("UNet-SDXL", "text", "gflops_256"): 180.12,  # SD 1.x layout: 864.11 M matches, its FLOPs are 5 % lower
    ("PixArt-XL/2", "text", "gflops_256"): 289.19,  # class PixArt + 77 tokens' k/v + cross-attention
    ("PixArt-XL/2", "text", "gflops_512"): 1222.77,  # the paper's 1,140 is below its own class model's 1,200
    ("mmDiT-XL/2", "text", "gflops_256"): 309.74,  # 77 context tokens through one set of block weights
    ("mmDiT-XL/2", "text", "gflops_512"): 1136.53,
    ("Att-DiT-XL/2", "text", "params"): 791.15,  # the class Att-DiT's blocks with text: the text mmDiT's model
    ("Att-DiT-XL/2", "text", "gflops_256"): 309.74,
    ("Att-DiT-XL/2", "text", "gflops_512"): 1136.53,
}


def test_tab_a1_cells():
    """All 30 numbers of Tab. A1: within 2 %, or the documented exception's measured number (and then still > 2 %
    off, else it belongs with the matched cells)."""
    assert set(PAPER) == set(run.TAB_A1) and len(PAPER) * len(KEYS) == 30
    report = []
    for (column, cond), paper in PAPER.items():
        (params, g256), (_, g512) = (bench.tab_a1_count(column, cond, R) for R in (256, 512))
        for key, got, want in zip(KEYS, (params, g256, g512), paper):
            dev = got / want - 1
            report.append(f"{column} {cond} {key}: {got:.2f} vs {want} ({dev:+.2%})")
            documented = EXCEPTIONS.get((column, cond, key))
            if documented is None:
                assert abs(dev) <= TOL, report[-1]
            else:
                assert abs(got - documented) <= 0.0051, f"{report[-1]}: documented exception says {documented}"
                assert abs(dev) > TOL, f"{report[-1]}: now within 2 %, drop it from EXCEPTIONS"
    print("\n".join(report))


@pytest.mark.parametrize("column,cond", sorted(run.TAB_A1))
def test_tab_a1_meta_count_is_the_real_count(column, cond):
    """The meta-device count (no compute) equals a real CPU forward's, params and FLOPs, on the tiny version of
    each cell's configuration at 64 px (8 x 8 latents)."""
    torch.manual_seed(0)
    meta = bench.tab_a1_count(column, cond, 64, size="tiny", device="meta")
    real = bench.tab_a1_count(column, cond, 64, size="tiny", device="cpu")
    assert meta == real and real[1] > 0


def test_tab_a1_spec_is_a_run_spec():
    """tab_a1_spec is build_model's arguments (what a run spec's "model" holds); an unknown cell is one line."""
    spec = run.tab_a1_spec("mmDiT-XL/2", "text", 512)
    assert spec["arch"] == "mmdit" and spec["input_size"] == 64 and spec["context_weights"] == "qkv"
    assert spec["text_dim"] == spec["pooled_dim"] == 768 and spec["control"] == ["crop", "size", "flip"]
    with torch.device("meta"):
        assert sum(p.numel() for p in models.build_model(**spec).parameters()) == \
               sum(p.numel() for p in run.tab_a1_model("mmDiT-XL/2", "text", 256).parameters())
    with pytest.raises(SystemExit, match="no cell"):
        run.tab_a1_spec("DiT-XL/2", "text")


# ----------------------------------------------------------------------------- MMDiT context_weights

def _tiny(arch, **kw):
    """A tiny model on 8 x 8 x 4 latents, every parameter perturbed so no branch hides behind a zero init."""
    torch.manual_seed(0)
    model = models.build_model(arch, "tiny", input_size=8, in_channels=4, control=("crop", "size", "flip"), **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(B=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.tensor([5, 400, 990]),
            {"y": torch.tensor([1, 10, 4]), "text": torch.randn(B, 7, 48, generator=g),
             "pooled": torch.randn(B, 24, generator=g), "phi": torch.rand(B, 5, generator=g) * 64,
             "keep_ctrl": torch.ones(B)})


def test_mmdit_shared_context_is_dit_with_att():
    """context_weights="shared" in class mode is DiT w/ Att (the class token through DiT's own block weights): the
    same parameters, and with DiT's weights moved over the same function (to fp32 rounding: the class token sits
    last instead of first, which attention does not see but the order of its sums does)."""
    dit = _tiny("dit", num_classes=10, class_in="attn")
    mm = _tiny("mmdit", num_classes=10, class_in="attn", context_weights="shared")
    sd = {k.replace(f"blocks.{k.split('.')[1]}.", f"blocks.{k.split('.')[1]}.x_stream.") if k.startswith("blocks.")
          else k: v for k, v in dit.state_dict().items()}
    mm.load_state_dict(sd)  # strict: the same tensors, nothing more, nothing less
    x, t, cond = _inputs()
    with torch.no_grad():
        want, got = dit(x, t, cond), mm(x, t, cond)
    assert want.abs().max() > 0.1 and (got - want).abs().max() <= _fp32_tol(want)  # fp32 rounding


@pytest.mark.parametrize("mode", [dict(num_classes=10, class_in="attn"), dict(text_dim=48, pooled_dim=24)],
                         ids=["class", "text"])
def test_mmdit_qkv_context(mode):
    """context_weights="qkv": the context owns exactly its q/k/v projections and q/k norms (k, v and k-norm in the
    last block), 3 D^2 + 3 D + 2 D/H per block; with the image stream's copied in, it computes the "shared" model;
    with its own, something else."""
    shared = _tiny("mmdit", context_weights="shared", **mode)
    qkv = _tiny("mmdit", context_weights="qkv", **mode)
    D, L, hd = shared.hidden, shared.depth, shared.hidden // shared.heads
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(qkv) - n(shared) == (L - 1) * (3 * D * D + 3 * D + 2 * hd) + (2 * D * D + 2 * D + hd)
    x, t, cond = _inputs()
    with torch.no_grad():
        differs = (qkv(x, t, cond) - shared(x, t, cond)).abs().max()
        qkv.load_state_dict(shared.state_dict(), strict=False)  # everything but the context's own projections
        for blk in qkv.blocks:
            img, ctx = blk.x_stream.attn, blk.c_attn
            rows = slice(D, 3 * D) if ctx.kv_only else slice(0, 3 * D)
            ctx.qkv.weight.copy_(img.qkv.weight[rows])
            ctx.qkv.bias.copy_(img.qkv.bias[rows])
            ctx.k_norm.weight.copy_(img.k_norm.weight)
            if ctx.q_norm is not None:
                ctx.q_norm.weight.copy_(img.q_norm.weight)
        want, got = shared(x, t, cond), qkv(x, t, cond)
    assert want.abs().max() > 0.1 and (got - want).abs().max() <= _fp32_tol(want)  # fp32 rounding
    assert differs > 1e-3  # its own projections are used


@pytest.mark.parametrize("context", ["qkv", "shared"])
@pytest.mark.parametrize("mode", [dict(num_classes=10, class_in="attn"), dict(text_dim=48, pooled_dim=24)],
                         ids=["class", "text"])
def test_mmdit_light_context_zero_init_and_grads(context, mode):
    """A fresh model predicts exactly 0 (adaLN-Zero), and after a nudge every parameter gets a gradient."""
    torch.manual_seed(0)
    model = models.build_model("mmdit", "tiny", input_size=8, in_channels=4, control=("crop", "size", "flip"),
                               context_weights=context, **mode)
    x, t, cond = _inputs()
    assert torch.equal(model(x, t, cond), torch.zeros_like(x))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model(x, t, cond).square().mean().backward()
    dead = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_mmdit_context_weights_refused():
    with pytest.raises(ValueError, match="context_weights"):
        models.build_model("mmdit", "tiny", num_classes=10, context_weights="half")


# ----------------------------------------------------------------------------- UNet: SD 1.x layout

# tiny SD 1.x-style reference: cross-attention at the finer levels, none at the coarsest, one layer in the mid block;
# linear projections and SDXL's text_time add-embedding as the Tab. A1 text UNet has
_SD1_CFG = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
                norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4, 4),
                cross_attention_dim=48, transformer_layers_per_block=1, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=24 + 6 * 8)


def test_equivalence_sd1_unet():
    """Our UNet with an SD 1.x layout (no attention at the coarsest level, mid_depth 1) computes what diffusers'
    UNet2DConditionModel does (to fp32 rounding), imported through weights.unet_kwargs_from_diffusers."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**_SD1_CFG)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    kw = weights.unet_kwargs_from_diffusers(ref.config)
    assert kw["depth"] == (1, 1, 0) and kw["mid_depth"] == 1
    ours = weights.import_diffusers_unet(models.UNet(**kw), ref).eval()
    ref = ref.eval()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 937])
    text, pooled = torch.randn(2, 7, 48, generator=g), torch.randn(2, 24, generator=g)
    ids = torch.tensor([[512.0, 640, 16, 32, 128, 128], [1024, 768, 0, 0, 128, 128]])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = ours(x, t, {"text": text, "pooled": pooled, "time_ids": ids})
    assert want.abs().max() > 0.1 and (got - want).abs().max() <= _fp32_tol(want)  # fp32 rounding


def test_tab_a1_text_unet_is_sd1():
    """The Tab. A1 text UNet has exactly the parameters and FLOPs of diffusers' SD 1.x UNet (widths 320..1280,
    8 heads, CLIP-L 768 cross-attention) with SDXL's text_time add-embedding, at 256 px (meta device)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    with meta:
        ref = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=768 + 6 * 256).eval()
    ctx = dict(encoder_hidden_states=torch.randn(1, 77, 768, device=meta),
               added_cond_kwargs={"text_embeds": torch.randn(1, 768, device=meta),
                                  "time_ids": torch.randn(1, 6, device=meta)})
    with FlopCounterMode(display=False, custom_mapping=run.FLOP_MAP) as fc, torch.no_grad():
        ref(torch.randn(1, 4, 32, 32, device=meta), torch.zeros(1, device=meta), **ctx)
    want = (sum(p.numel() for p in ref.parameters()) / 1e6, fc.get_total_flops() / 1e9)
    assert bench.tab_a1_count("UNet-SDXL", "text", 256) == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------- models.py

_CTRL = ("crop", "size", "flip")


def _modes(arch):
    """Every conditioning mode an architecture supports: class via each class_in, and text."""
    cls = models.MODELS[arch]
    modes = [dict(num_classes=10, class_in=ci) if "class_in" in models.arch_kwargs(arch) else dict(num_classes=10)
             for ci in getattr(cls, "class_in_modes", ("adaln",))]  # the UNet takes no class_in: attention only
    if getattr(cls, "supports_text", False):
        modes.append(dict(text_dim=48, pooled_dim=24))
    return modes


_CASES = [(a, m) for a in models.MODELS for m in _modes(a)]
_CASE_IDS = [f"{a}-{m.get('class_in', 'attn' if 'num_classes' in m else 'text')}" for a, m in _CASES]


def _model_inputs(B=2, C=4, R=16, text_dim=48, pooled_dim=24):
    return (torch.randn(B, C, R, R), torch.randint(0, 1000, (B,)),
            {"y": torch.tensor([3, 10, 7, 1][:B]), "text": torch.randn(B, 77, text_dim),
             "pooled": torch.randn(B, pooled_dim), "phi": torch.rand(B, 5) * 256, "keep_ctrl": torch.ones(B)})


def _rebuilt(ref, ours):
    """Regression: an imported model is saved, rebuilt from its build_model arguments alone (a run spec's "model",
    JSON round-tripped as config.json does) and reloaded; it must compute exactly what the imported model computes:
    nothing may be set after construction."""
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    model = models.build_model(**json.loads(json.dumps(weights.diffusers_kwargs(ref))))
    model.load_state_dict(torch.load(buf))
    return model.eval()


def _preds(out):
    """A model's output as a tuple of predictions: mDT-v2 returns (unmasked, masked) in train mode."""
    return out if isinstance(out, tuple) else (out,)


def test_equivalence_dit(randomize):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    ref = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10).eval()
    randomize(ref)
    with pytest.raises(ValueError):  # untied per-block embedders cannot be one DiT: the importer must refuse
        weights.import_diffusers(ref)
    with torch.no_grad():  # converted DiT checkpoints tie them: do the same
        for blk in ref.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    ours = weights.import_diffusers(ref).eval()
    x, t, cond = _model_inputs()
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=cond["y"]).sample[:, :4]  # eps half of eps + variance
        got = ours(x, t, cond)
        assert torch.equal(_rebuilt(ref, ours)(x, t, cond), got)
    err = (got - want).abs().max().item()
    print(f"DiT max abs err {err:.2e}")
    assert weights._size(1152, 28, 16) == "XL"  # a public DiT-XL/2 travels as size XL
    assert err <= _fp32_tol(want), err  # fp32 rounding of the outputs (_fp32_tol)


def test_equivalence_pixart(randomize):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    ref = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                   num_layers=2, cross_attention_dim=32, sample_size=16, patch_size=2,
                                   caption_channels=48, interpolation_scale=2).eval()  # 2: PE grid / 2 (PixArt 512)
    randomize(ref)
    ours = weights.import_diffusers(ref).eval()
    x, t, cond = _model_inputs()
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=cond["text"], timestep=t,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
        got = ours(x, t, cond)
        assert torch.equal(_rebuilt(ref, ours)(x, t, cond), got)
    err = (got - want).abs().max().item()
    print(f"PixArt max abs err {err:.2e}")
    assert err <= _fp32_tol(want), err  # fp32 rounding of the outputs (_fp32_tol)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_equivalence_sd3_mmdit(qk_norm, randomize):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    ref = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                caption_projection_dim=32, pooled_projection_dim=24, pos_embed_max_size=32,
                                qk_norm=qk_norm).eval()
    randomize(ref)
    ours = weights.import_diffusers(ref).eval()
    x, t, cond = _model_inputs()
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=cond["text"], pooled_projections=cond["pooled"], timestep=t).sample
        got = ours(x, t, cond)
        # a non-square input exercises SD3's centre-cropped PE on both axes
        x2 = torch.randn(2, 4, 12, 20)
        want2 = ref(x2, encoder_hidden_states=cond["text"], pooled_projections=cond["pooled"], timestep=t).sample
        got2 = ours(x2, t, cond)
        rebuilt = _rebuilt(ref, ours)
        assert torch.equal(rebuilt(x, t, cond), got) and torch.equal(rebuilt(x2, t, cond), got2)
    err = max((got - want).abs().max().item(), (got2 - want2).abs().max().item())
    print(f"SD3 (qk_norm={qk_norm}) max abs err {err:.2e}")
    assert err <= _fp32_tol(want), err  # fp32 rounding of the outputs (_fp32_tol)


def _build(arch, **kw):
    """build_model at 16 px latents (the UNet takes no input_size: it is fully convolutional)."""
    if arch != "unet":
        kw["input_size"] = 16
    return models.build_model(arch, "tiny", in_channels=4, control=_CTRL, **kw)


@pytest.mark.parametrize("arch,mode", _CASES, ids=_CASE_IDS)
def test_zero_init_outputs_zero(arch, mode):
    torch.manual_seed(0)
    model = _build(arch, **mode)
    x, t, cond = _model_inputs()
    for train in (True, False):
        model.train(train)
        for out in _preds(model(x, t, cond)):
            assert out.shape == x.shape
            assert torch.equal(out, torch.zeros_like(out)), f"{arch} fresh output is not exactly 0"


@pytest.mark.parametrize("arch,mode", _CASES, ids=_CASE_IDS)
def test_every_param_gets_grad(arch, mode, randomize):
    torch.manual_seed(0)
    model = _build(arch, **mode).train()
    randomize(model)
    x, t, cond = _model_inputs(B=4)
    cond["phi"][:, 2] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # flip flag as the data gives it
    t = torch.tensor([10, 300, 600, 900])  # gamma_c(t) > 0 for some samples, so the size branch is live
    sum(p.square().mean() for p in _preds(model(x, t, cond))).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, f"{arch}: parameters without gradient: {dead}"


def test_pe_resample(randomize):
    n_base = 8
    base = models.grid_1d(n_base, "resample", n_base)
    up = models.grid_1d(2 * n_base, "resample", n_base)
    assert up.min() == base.min() and up.max() == base.max() == n_base  # same span at 2x resolution
    assert len(up) == 2 * n_base and torch.allclose(up[1] - up[0], torch.tensor(n_base / (2 * n_base - 1), dtype=up.dtype))
    ext = models.grid_1d(2 * n_base, "extrapolate")
    assert ext.max() > models.grid_1d(n_base, "extrapolate").max()  # extrapolation leaves the trained range
    # a model built for 16x16 latents runs at 32x32 in both modes, and the modes give different embeddings there
    torch.manual_seed(0)
    outs = {}
    for mode in models.PE_GRIDS:
        model = models.build_model("dit", "tiny", input_size=16, in_channels=4, num_classes=10, pe_grid=mode)
        randomize(model)
        pe = model.x_embedder.pos_embed(16, 16, torch.device("cpu"))
        assert pe.shape == (1, 256, model.hidden)
        x, t, cond = _model_inputs(R=32)
        outs[mode] = (pe, model(x, t, cond))
        assert outs[mode][1].shape == x.shape
    assert not torch.allclose(outs["resample"][0], outs["extrapolate"][0])


def _mdt_tiny(randomize):
    torch.manual_seed(0)
    model = models.build_model("mdt", "tiny", input_size=16, in_channels=4, num_classes=10, mask_ratio=0.3)
    randomize(model)
    return model


def test_mdt_masking_train_only(randomize):
    model = _mdt_tiny(randomize)
    x, t, cond = _model_inputs()
    model.eval()
    with torch.no_grad():
        e1, e2 = model(x, t, cond), model(x, t, cond)
        model.mask_ratio = 0.0  # eval output must not depend on the mask ratio at all
        e3 = model(x, t, cond)
        model.mask_ratio = 0.3
        model.train()
        tr = model(x, t, cond)
    assert torch.equal(e1, e2) and torch.equal(e1, e3), "eval output changed: masking leaked into eval"
    assert isinstance(tr, tuple) and len(tr) == 2, "mDT-v2 in train mode returns (unmasked, masked) predictions"
    assert not torch.allclose(tr[1], e1, atol=1e-4), "training mode output ignores the mask"


def test_mdt_trains_unmasked_pass(randomize):
    """Regression: MDTv2 adds the loss of the full, unmasked input at every step (same t, same x_t), so the path used at
    inference is trained too; the training loss is the sum of the two passes' losses."""
    model = _mdt_tiny(randomize)
    x0, t, cond = _model_inputs(B=3)
    cond = {"y": torch.tensor([3, 10, 7])}
    eps, sched = torch.randn_like(x0), Schedule()
    with torch.no_grad():
        want_full = model.eval()(sched.q_sample(x0, t, eps), t, cond)  # the inference path
        model.train()
        gen = lambda: dict(cond, mask_generator=torch.Generator().manual_seed(5))  # the same mask in both calls
        full, masked = model(sched.q_sample(x0, t, eps), t, gen())
        _, per_sample, _ = diffusion.loss_fn(model, sched, x0, gen(), t, eps)
    assert torch.equal(full, want_full), "the unmasked pass of training is not the inference path"
    mse = lambda p: (p - eps).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(per_sample, mse(full) + mse(masked), rtol=1e-6, atol=0)


def test_mdt_mask_from_generator(randomize):
    """Regression: mDT's mask comes from cond["mask_generator"] (train.py: a function of (seed, step, chunk)), not from the
    global RNG, so mDT training is a function of (seed, step)."""
    model = _mdt_tiny(randomize).train()
    x, t, cond = _model_inputs()
    cond = {"y": cond["y"]}
    outs = []
    with torch.no_grad():
        for gseed, global_seed in ((5, 0), (5, 1), (6, 0)):
            torch.manual_seed(global_seed)
            outs.append(model(x, t, dict(cond, mask_generator=torch.Generator().manual_seed(gseed)))[1])
    assert torch.equal(outs[0], outs[1]), "the mask depends on the global RNG"
    assert not torch.allclose(outs[0], outs[2]), "the mask ignores its generator"


def test_import_dit_original_layout(randomize):
    """A facebookresearch/DiT-style state_dict (stored pos_embed, 8 output channels eps + variance) imports exactly."""
    torch.manual_seed(0)
    src = models.build_model("dit", "tiny", input_size=16, in_channels=4, num_classes=10)
    randomize(src)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    D, p = src.hidden, src.patch_size
    for n in ("weight", "bias"):  # interleave a fake variance half: rows are ordered (p, q, c) with c = 8 channels
        eps = sd[f"final_layer.linear.{n}"].view(p * p, 4, *sd[f"final_layer.linear.{n}"].shape[1:])
        sd[f"final_layer.linear.{n}"] = torch.cat([eps, torch.randn_like(eps)], 1).flatten(0, 1)
    sd["pos_embed"] = torch.zeros(1, 64, D)
    ours = weights.import_dit_original(sd)
    x, t, cond = _model_inputs()
    with torch.no_grad():
        assert torch.equal(ours(x, t, cond), src(x, t, cond))


# ----------------------------------------------------------------------------- models.py: SDXL UNet

# tiny SDXL-style reference config (REFERENCES.md): 2 levels, cross-attn at the coarse one, "text_time" add-embedding
_UNET_DIFFUSERS_CFG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    norm_num_groups=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), cross_attention_dim=32,
    transformer_layers_per_block=(1, 1), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8)


def _unet_perturb(model, std=0.02):
    """Give every parameter (zero-initialised ones included) a random nudge, so no branch starts dead."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def _unet_conds(B, num_classes=None, text_dim=32, pooled_dim=24):
    phi = torch.tensor([[3.0, 5.0, 1.0, 300.0, 400.0]]).repeat(B, 1)  # crop_top, crop_left, flip, orig_h, orig_w
    if num_classes:
        return {"y": torch.arange(B) % (num_classes + 1), "phi": phi}  # includes the null id
    return {"text": torch.randn(B, 7, text_dim), "pooled": torch.randn(B, pooled_dim), "phi": phi}


def test_equivalence_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = _unet_perturb(UNet2DConditionModel(**_UNET_DIFFUSERS_CFG)).eval()  # diffusers zero-inits nothing here,
    ours = import_diffusers_unet(UNet(**unet_kwargs_from_diffusers(ref.config)), ref).eval()  # but perturb anyway
    B = 2
    x, t = torch.randn(B, 4, 16, 15), torch.tensor([10, 937])  # odd width exercises the upsample-to-skip-size path
    text, pooled = torch.randn(B, 7, 32), torch.randn(B, 24)
    time_ids = torch.tensor([[512.0, 640, 16, 32, 256, 256], [1024, 768, 0, 0, 512, 512]])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=text,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(x, t, {"text": text, "pooled": pooled, "time_ids": time_ids})
    err = (got - want).abs().max().item()
    assert want.abs().max() > 0.1 and err <= _fp32_tol(want), f"max abs diff {err:.3g}"  # fp32 rounding
    # importing into a model with our control: the (zero-init) control embedder is the only new module
    ours_c = import_diffusers_unet(UNet(**unet_kwargs_from_diffusers(ref.config), control=("crop", "size")), ref)
    phi = torch.tensor([[16.0, 32, 0, 512, 640], [0, 0, 1, 1024, 768]])
    with torch.no_grad():
        got = ours_c.eval()(x, t, {"text": text, "pooled": pooled, "time_ids": time_ids, "phi": phi})
    assert (got - want).abs().max() <= _fp32_tol(want)  # fp32 rounding of the outputs
    # the phi route builds the same time ids: (orig_h, orig_w, crop_top, crop_left, target = 8 x latent size)
    x = torch.randn(B, 4, 16, 16)
    ids = torch.tensor([[512.0, 640, 16, 32, 128, 128], [1024, 768, 0, 0, 128, 128]])
    with torch.no_grad():
        a = ours(x, t, {"text": text, "pooled": pooled, "phi": phi})
        b = ours(x, t, {"text": text, "pooled": pooled, "time_ids": ids})
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["class", "text", "text_sdxl"])
def test_unet_zero_init_and_grads(mode):
    torch.manual_seed(0)
    kw = dict(num_classes=10) if mode == "class" else dict(text_dim=32, pooled_dim=24)
    model = UNet(**UNET_SIZES["tiny"], **kw, in_channels=4, control=("crop", "size", "flip"), gamma="uniform",
                 time_ids=mode == "text_sdxl")
    cond = _unet_conds(4, **({"num_classes": 10} if mode == "class" else {}))
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([0, 250, 500, 999])
    assert torch.equal(model(x, t, cond), torch.zeros_like(x))  # fresh model: eps = 0 exactly
    _unet_perturb(model)
    loss = (model(x, t, cond) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, f"parameters without gradient: {dead}"
