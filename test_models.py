"""Tests of models.py's paper Tab. A1 configurations: `.venv/bin/python -m pytest -q test_models.py`.

Every cell of Tab. A1 (params, GFLOPs at 256 and 512 px, class and text rows) against the models tab_a1_model
builds, counted on the meta device; the meta count against a real one; the context-stream options of MMDiT and the
SD 1.x UNet layout against what they claim to be (DiT w/ Att, shared weights, diffusers' UNet2DConditionModel).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail at once, never retry

import pytest  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402
import models  # noqa: E402
import run  # noqa: E402
import transfer  # noqa: E402

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
    UNet2DConditionModel does (to fp32 rounding), imported through transfer.unet_kwargs_from_diffusers."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**_SD1_CFG)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    kw = transfer.unet_kwargs_from_diffusers(ref.config)
    assert kw["depth"] == (1, 1, 0) and kw["mid_depth"] == 1
    ours = transfer.import_diffusers_unet(models.UNet(**kw), ref).eval()
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
