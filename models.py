"""
The denoisers the paper compares (paper §2 "Model architectures", Tab. A1), in plain PyTorch:
DiT (class in adaLN, or class in attention), mDT-v2, PixArt-α, mmDiT (SD3) and the SDXL UNet, with their blocks,
size presets and the registry. Attention goes through F.scaled_dot_product_attention only. Weight importers
(diffusers, facebookresearch/DiT) live in weights.py; everything a reference computes differently is a constructor
argument, so an imported model is rebuilt from its keyword arguments alone. This file imports no project file but
conditioning.py (the embedders); checkpoints, devices and sampling are run.py's.

One interface for every model:  eps = model(x_t, t, cond)   (eps has the shape of x_t)
    x_t : (B, C, H, W) noisy latents;  t : (B,) timesteps in [0, T) (long or float)
    cond: dict, built by conditioning.py / data.py
      class mode : cond["y"]      (B,) long, null id == num_classes (last row of the label table)
      text mode  : cond["text"]   (B, 77, text_dim) token features;  cond["pooled"] (B, pooled_dim)
      control    : cond["phi"]    (B, 5) = conditioning.PHI_KEYS in original-image pixels,
                   cond["keep_ctrl"] (B,) 1 = use, 0 = dropped. Either key may be absent (= no control).
      training   : cond["mask_generator"] CPU torch.Generator of mDT's token mask (optional; train.py sets it).
    In train mode mDT-v2 returns (eps of the full input, eps of a masked copy); the loss sums their losses.
Presets: SIZES (tiny for CPU, S/B/L/XL with DiT's widths/depths); registry MODELS; build_model(arch, size, ...);
UNET_TEXT_SIZES: the text UNet's layout at XL (the paper's Tab. A1 cells are run.TAB_A1).

Example: python -c "import models, torch; m = models.build_model('dit', 'tiny', num_classes=10);
                    print(m(torch.randn(2, 3, 32, 32), torch.tensor([3, 999]), {'y': torch.tensor([0, 10])}).shape)"
"""
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from conditioning import (CROP_LEFT, CROP_TOP, ORIG_H, ORIG_W, ControlEmbedder, LabelEmbedder, TimestepEmbedder,
                          timestep_embedding)

# ----------------------------------------------------------------------------- presets
# DiT Tab. 1 widths/depths/heads (patch 2 everywhere); "tiny" runs a forward in milliseconds on a CPU.
SIZES = {
    "tiny": dict(hidden=64, depth=4, heads=4),
    "S": dict(hidden=384, depth=12, heads=6),
    "B": dict(hidden=768, depth=12, heads=12),
    "L": dict(hidden=1024, depth=24, heads=16),
    "XL": dict(hidden=1152, depth=28, heads=16),
}
PE_GRIDS = ("extrapolate", "resample")  # §2.2 / App. C Pseudocode 1
LN_EPS = 1e-6  # every LayerNorm / RMSNorm in DiT, PixArt and SD3

TIME_ID_DIM = 256  # SDXL: each micro-conditioning scalar -> 256 Fourier features (addition_time_embed_dim)

# presets: channels per level, ResBlocks per level, transformer layers per level (0 = none: SDXL has no attention at
# its finest level), head width (64 as SDXL), class-mode context width. S..XL: SDXL's 3-level layout at ImageNet
# latent size with base width c = 64/128/192/256 and widths (c, 2c, 4c); XL is Tab. A1's class UNet (run.TAB_A1).
UNET_SIZES = {
    "tiny": dict(channels=(32, 64), layers=1, depth=(0, 1), head_dim=16, class_dim=32),  # 1.0M (text), the test config
    "S": dict(channels=(64, 128, 256), layers=2, depth=(0, 1, 1), head_dim=64, class_dim=256),  # 25.8M
    "B": dict(channels=(128, 256, 512), layers=2, depth=(0, 1, 1), head_dim=64, class_dim=512),  # 101.1M
    "L": dict(channels=(192, 384, 768), layers=2, depth=(0, 1, 1), head_dim=64, class_dim=768),  # 225.9M
    "XL": dict(channels=(256, 512, 1024), layers=2, depth=(0, 1, 1), head_dim=64, class_dim=1024),  # 400.1M
}

# the text UNet at XL: SD 1.x's layout (run.TAB_A1: Tab. A1's text UNet-SDXL column)
UNET_SD1 = dict(channels=(320, 640, 1280, 1280), layers=2, depth=(1, 1, 1, 0), head_dim=64, class_dim=1024)
UNET_TEXT_SIZES = {"XL": dict(UNET_SD1, mid_depth=1)}  # the text UNet at XL (Tab. A1 text column): SD 1.x's layout


# ----------------------------------------------------------------------------- helpers
def _ln(dim, eps=LN_EPS):
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)  # affine comes from adaLN


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, fused into one kernel; x (B, N, D), shift/scale (B, 1, D)."""
    return torch.addcmul(shift, x, 1 + scale)


def split_heads(x, n, heads):
    """(B, N, n*D) -> n tensors (B, heads, N, D/heads), the layout scaled_dot_product_attention wants."""
    return x.unflatten(-1, (n, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def grid_1d(n, mode="extrapolate", n_base=None):
    """Patch positions along one axis (§2.2). `extrapolate`: arange(n), a bigger image reaches positions never
    seen in pre-training. `resample` (paper App. C Pseudocode 1): linspace(0, n_base, n), every resolution spans the
    pre-training range [0, n_base]. We keep linspace's endpoint (=n_base) exactly as the pseudocode does, so even at
    the base resolution `resample` steps by n_base/(n_base-1), not 1: train and transfer with the same mode."""
    if mode == "extrapolate":
        return torch.arange(n, dtype=torch.float64)
    if mode == "resample":
        return torch.linspace(0, n_base, n, dtype=torch.float64)
    raise ValueError(f"pe_grid must be one of {PE_GRIDS}, got {mode!r}")


def sincos_2d(dim, gy, gx):
    """2-D sin-cos embedding (MAE/DiT layout: first half of channels encodes the column, second half the row)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    ex, ey = gx[:, None] * omega, gy[:, None] * omega  # (w, D/4), (h, D/4)
    ex, ey = torch.cat([ex.sin(), ex.cos()], 1), torch.cat([ey.sin(), ey.cos()], 1)  # (w, D/2), (h, D/2)
    h, w = len(gy), len(gx)
    return torch.cat([ex[None].expand(h, w, -1), ey[:, None].expand(h, w, -1)], -1).reshape(h * w, dim)


# ----------------------------------------------------------------------------- shared blocks
class PatchEmbed(nn.Module):
    """Patchify conv + fixed 2-D sin-cos PE computed for the input's actual grid (§2.2: resolution transfer)."""

    def __init__(self, in_channels, dim, patch_size, pe_grid="extrapolate", pe_base=None, pe_scale=1.0, pe_max=None):
        super().__init__()
        assert pe_grid in PE_GRIDS, f"pe_grid must be one of {PE_GRIDS}"
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.patch_size, self.dim = patch_size, dim
        self.pe_grid, self.pe_base = pe_grid, pe_base  # pe_base: grid size (patches) at pre-training resolution
        # For imported reference grids (weights.py): positions are divided by pe_scale (PixArt's
        # interpolation_scale; SD3's max_size/base_size), and SD3 centre-crops a pe_max x pe_max grid.
        self.pe_scale, self.pe_max = pe_scale, pe_max
        self._pe_key, self._pe = None, None  # cache: one PE per grid size / device (not a parameter, not saved)

    def axis(self, n):
        m = self.pe_max or n
        g = grid_1d(m, self.pe_grid, self.pe_base) / self.pe_scale
        start = (m - n) // 2  # SD3 centre crop; 0 otherwise
        return g[start:start + n]

    def pos_embed(self, h, w, device):
        key = (h, w, device, self.pe_grid, self.pe_base, self.pe_scale, self.pe_max)
        if key != self._pe_key:  # float64 on the CPU once, then cached on the device
            self._pe = sincos_2d(self.dim, self.axis(h), self.axis(w)).float().to(device)[None]  # (1, N, D)
            self._pe_key = key
        return self._pe

    def forward(self, x):
        x = self.proj(x)  # (B, D, h, w)
        h, w = x.shape[-2:]
        # .contiguous() once here: otherwise the residual stream inherits the conv's (B, D, N) layout and every
        # LayerNorm copies it; PE cast to the activation dtype so autocast keeps the stream in bf16 (as diffusers).
        return x.flatten(2).transpose(1, 2).contiguous() + self.pos_embed(h, w, x.device).to(x.dtype), (h, w)


class Mlp(nn.Module):
    """Transformer MLP with tanh-GELU (DiT, PixArt, SD3); also PixArt's caption projection."""

    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv, optional q/k RMSNorm (SD3 §5.3.2; paper §2 'w/ Att' needs it)."""

    def __init__(self, dim, heads, qk_norm=False, kv_only=False, proj=True):
        super().__init__()
        self.heads, self.kv_only = heads, kv_only
        # kv_only: SD3's last context stream only feeds keys/values, its queries/outputs would be discarded
        self.qkv = nn.Linear(dim, (2 if kv_only else 3) * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=LN_EPS) if qk_norm and not kv_only else None
        self.k_norm = nn.RMSNorm(dim // heads, eps=LN_EPS) if qk_norm else None
        # proj=False: only the input projections (an mmDiT context whose output goes through the image stream's)
        self.proj = None if kv_only or not proj else nn.Linear(dim, dim)

    def project(self, x):
        """(B, N, D) -> q, k, v (B, H, N, D/H); q is None for kv_only."""
        if self.kv_only:
            q, (k, v) = None, split_heads(self.qkv(x), 2, self.heads)
        else:
            q, k, v = split_heads(self.qkv(x), 3, self.heads)
        if self.k_norm is not None:  # weight cast to the activation dtype: keeps the fused RMSNorm kernel under bf16
            k = F.rms_norm(k, k.shape[-1:], self.k_norm.weight.to(k.dtype), LN_EPS)
            q = q if q is None else F.rms_norm(q, q.shape[-1:], self.q_norm.weight.to(q.dtype), LN_EPS)
        return q, k, v

    def out(self, o):
        return self.proj(o.transpose(1, 2).flatten(2))  # (B, H, N, D/H) -> (B, N, D)

    def forward(self, x):
        return self.out(F.scaled_dot_product_attention(*self.project(x)))


class CrossAttention(nn.Module):
    """Image queries attend to context tokens (PixArt-α §2.3: text, or class tokens in class mode)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, ctx):
        (q,) = split_heads(self.q(x), 1, self.heads)  # (B, H, N, D/H)
        k, v = split_heads(self.kv(ctx), 2, self.heads)  # (B, H, L, D/H)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))  # (B, N, D)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero (DiT §3.2); `skip` adds mDT-v2's long-skip fusion (MDT §3.3)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, qk_norm=False, skip=False, mlp_norm_eps=LN_EPS):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.attn = _ln(dim), Attention(dim, heads, qk_norm)
        self.norm2, self.mlp = _ln(dim, mlp_norm_eps), Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, skip=None):
        if self.skip_linear is not None:  # U-ViT style long skip: concat then project back to D
            x = self.skip_linear(torch.cat([x, skip], -1))  # (B, N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, -1)
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class PixArtBlock(nn.Module):
    """PixArt-α block (PixArt-α §2.3): adaLN-single = global t-MLP output + this block's learned scale_shift_table,
    self-attention, un-normalised cross-attention to the context, MLP."""

    def __init__(self, dim, heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1, self.attn = _ln(dim), Attention(dim, heads, qk_norm)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2, self.mlp = _ln(dim), Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, t6, ctx):  # t6: (B, 6, D) from the shared t_block
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table + t6).chunk(6, 1)
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = x + self.cross_attn(x, ctx)
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class JointStream(nn.Module):
    """One stream (image or context) of an SD3 joint block (SD3 §4 Fig. 2b): its own adaLN, qkv, q/k norm, MLP.
    `pre_only` (the context stream of the last block) only supplies keys/values, as in SD3."""

    def __init__(self, dim, heads, mlp_ratio=4.0, qk_norm=True, pre_only=False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1, self.attn = _ln(dim), Attention(dim, heads, qk_norm, kv_only=pre_only)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))
        if not pre_only:
            self.norm2, self.mlp = _ln(dim), Mlp(dim, int(dim * mlp_ratio))

    def pre(self, x, c):
        mod = self.adaLN_modulation(c)[:, None].chunk(2 if self.pre_only else 6, -1)  # each (B, 1, D)
        return self.attn.project(modulate(self.norm1(x), mod[0], mod[1])), mod

    def post(self, x, o, mod):  # o: this stream's rows of the joint attention output, (B, H, N, D/H)
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[2:]
        x = torch.addcmul(x, gate_msa, self.attn.out(o))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


CONTEXT_WEIGHTS = ("full", "qkv", "shared")  # MMDiT's context-stream weights (MMDiTBlock)


class MMDiTBlock(nn.Module):
    """SD3 joint block: one attention over [image; context] tokens (SD3 §4). `context` says which weights the context
    tokens own: "full" = SD3, a whole second stream (adaLN, qkv, q/k norm, out-projection, MLP: 18 D^2 per block);
    "qkv" = only their own q/k/v projection and q/k norm (3 D^2), modulated by and continuing through the image
    stream's adaLN, out-projection and MLP; "shared" = none, the context tokens go through the image stream's weights
    (as the class token of DiT w/ Att). FLOPs are the same in the three: every token passes one set of weights."""

    def __init__(self, dim, heads, mlp_ratio=4.0, qk_norm=True, last=False, context="full"):
        super().__init__()
        assert context in CONTEXT_WEIGHTS, f"context must be one of {CONTEXT_WEIGHTS}"
        self.last = last  # the last block needs no context queries: its context output is discarded
        self.x_stream = JointStream(dim, heads, mlp_ratio, qk_norm)
        self.c_stream = JointStream(dim, heads, mlp_ratio, qk_norm, pre_only=last) if context == "full" else None
        self.c_attn = Attention(dim, heads, qk_norm, kv_only=last, proj=False) if context == "qkv" else None

    def context_pre(self, ctx, c, mx):
        """Context q, k, v (q None in the last block) and the adaLN modulation its post-attention half uses."""
        if self.c_stream is not None:
            return self.c_stream.pre(ctx, c)
        h = modulate(self.x_stream.norm1(ctx), mx[0], mx[1])  # the image stream's adaLN shift / scale
        q, k, v = (self.c_attn or self.x_stream.attn).project(h)
        return (None if self.last else q, k, v), mx

    def forward(self, x, ctx, c):
        (qx, kx, vx), mx = self.x_stream.pre(x, c)
        (qc, kc, vc), mc = self.context_pre(ctx, c, mx)
        q = qx if qc is None else torch.cat([qx, qc], 2)  # (B, H, N(+L), D/H): last block needs no context queries
        o = F.scaled_dot_product_attention(q, torch.cat([kx, kc], 2), torch.cat([vx, vc], 2))
        N = x.shape[1]
        x = self.x_stream.post(x, o[:, :, :N], mx)
        if qc is None:
            return x, None
        return x, (self.c_stream or self.x_stream).post(ctx, o[:, :, N:], mc)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear to patch pixels (DiT); `single`: PixArt's learned table replaces the Linear."""

    def __init__(self, dim, patch_size, out_channels, single=False):
        super().__init__()
        self.norm_final = _ln(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.single = single
        if single:
            self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        if self.single:
            shift, scale = (self.scale_shift_table + c[:, None]).chunk(2, 1)  # (B, 1, D) each
        else:
            shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C)


# ----------------------------------------------------------------------------- UNet blocks (SDXL)
# SDXL UNet layout (diffusers UNet2DConditionModel with an SDXL config, proven equal by test_equivalence_sdxl_unet):
#   conv_in -> down levels [ResBlock (+ SpatialTransformer)] x layers, stride-2 conv
#   -> mid [ResBlock, SpatialTransformer, ResBlock]
#   -> up levels [concat skip, ResBlock (+ SpatialTransformer)] x (layers+1), nearest x2 + conv -> GN, SiLU, conv_out.
#   SpatialTransformer = GroupNorm, linear proj_in, depth x [self-attn, cross-attn, GEGLU FF] (pre-LN), linear proj_out.
# Vector conditioning, all summed into the time embedding `emb` that every ResBlock receives:
#   t -> sinusoidal(channels[0]) -> MLP                                            (SD/SDXL timestep embedding)
#   text mode: pooled text [+ SDXL time ids] -> MLP                                ("text_time" add-embedding)
#   control (paper §3.1): ControlEmbedder(phi, t, keep), gamma_c-weighted size      (our Eq. 1)
#   SDXL-compat (time_ids=True): Fourier(256) of (orig_h, orig_w, crop_top, crop_left, target_h, target_w) go
#     into the add-embedding as in SDXL; taken from cond["time_ids"] or built from cond["phi"] (flip unused;
#     keep_ctrl = 0 zeroes the ids). Our control and SDXL time ids can be combined but normally one is used.
# Token conditioning (cross-attention context): text tokens cond["text"], or in class mode `class_tokens` learned
#   tokens per class (LDM cin256 routes the class through cross-attention, paper Tab. A4 "Cross-attention").
#   Deliberate choice: several tokens, not LDM's one, because a softmax over one key has zero gradient wrt to_k.
class ResBlock(nn.Module):
    """LDM/SDXL ResnetBlock2D: GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-conv, residual (1x1 conv if widths differ)."""

    def __init__(self, cin, cout, emb_dim, groups=32):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-5), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-5), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # time/cond embedding as a per-channel bias
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout 0 in SDXL: omitted)
        return self.skip(x) + h  # output_scale_factor = 1 in SDXL


class UNetAttention(nn.Module):
    """Multi-head (cross-)attention, bias-free q/k/v as in SD, via F.scaled_dot_product_attention (scale 1/sqrt(hd))."""

    def __init__(self, dim, ctx_dim, head_dim):
        super().__init__()
        self.heads = dim // head_dim
        self.q, self.k, self.v = (nn.Linear(d, dim, bias=False) for d in (dim, ctx_dim, ctx_dim))
        self.out = nn.Linear(dim, dim)

    def forward(self, x, ctx):
        B, N, D = x.shape
        q, k, v = (p(s).view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # (B, H, N|L, hd)
                   for p, s in ((self.q, x), (self.k, ctx), (self.v, ctx)))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class UNetTransformerBlock(nn.Module):
    """SD BasicTransformerBlock: pre-LN self-attention, cross-attention to the context, GEGLU feed-forward (4x)."""

    def __init__(self, dim, ctx_dim, head_dim):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), UNetAttention(dim, dim, head_dim)
        self.norm2, self.attn2 = nn.LayerNorm(dim), UNetAttention(dim, ctx_dim, head_dim)
        self.norm3, self.ff_in, self.ff_out = nn.LayerNorm(dim), nn.Linear(dim, 8 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x, ctx):
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), ctx)
        h, gate = self.ff_in(self.norm3(x)).chunk(2, dim=-1)  # GEGLU (Shazeer 2020): value * gelu(gate), 4x wide
        return x + self.ff_out(h * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """SDXL spatial transformer with linear in/out projections (use_linear_projection=True)."""

    def __init__(self, dim, ctx_dim, head_dim, depth, groups=32):
        super().__init__()
        self.norm, self.proj_in = nn.GroupNorm(groups, dim, eps=1e-6), nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(UNetTransformerBlock(dim, ctx_dim, head_dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, ctx):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, H*W, C)
        for blk in self.blocks:
            h = blk(h, ctx)
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class UNetLevel(nn.Module):
    """One resolution of the UNet: ResBlocks, an optional SpatialTransformer after each, and a down/up-sampling conv."""

    def __init__(self, cins, cout, emb_dim, ctx_dim, head_dim, depth, sample):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, cout, emb_dim) for c in cins)
        self.attn = nn.ModuleList(SpatialTransformer(cout, ctx_dim, head_dim, depth) for _ in cins) if depth else None
        self.sample = {"down": nn.Conv2d(cout, cout, 3, stride=2, padding=1),
                       "up": nn.Conv2d(cout, cout, 3, padding=1), None: None}[sample]


# ----------------------------------------------------------------------------- models
class _Transformer(nn.Module):
    """Parts every transformer denoiser shares: patch embedding + PE, t / class / control embedders, final layer."""

    supports_text = False  # text mode (cond["text"], cond["pooled"]); paper Tab. 1: UNet, PixArt, mmDiT
    class_in_modes = ("adaln",)  # where the class embedding may enter

    def __init__(self, *, hidden, depth, heads, input_size=32, in_channels=3, patch_size=2, num_classes=None,
                 text_dim=None, pooled_dim=None, class_in="adaln", control=(), gamma="cosine", gamma_alpha=8.0,
                 gamma_step_sigma=1.0, pe_grid="extrapolate", pe_base=None, mlp_ratio=4.0, class_tokens=1,
                 single_final=False, t_freq_shift=0, pe_scale=1.0, pe_max=None, schedule_scale=1.0):
        super().__init__()
        if (num_classes is None) == (text_dim is None):
            raise ValueError("give exactly one of num_classes (class mode) / text_dim (text mode)")
        if text_dim is not None and not self.supports_text:
            raise ValueError(f"{type(self).__name__} is class-conditional only (paper Tab. 1)")
        if class_in not in self.class_in_modes:
            raise ValueError(f"{type(self).__name__}: class_in must be one of {self.class_in_modes}")
        self.in_channels, self.patch_size, self.hidden, self.depth, self.heads = in_channels, patch_size, hidden, depth, heads
        self.mlp_ratio, self.class_in = mlp_ratio, class_in
        # t_freq_shift, pe_scale, pe_max: only to reproduce imported reference models (weights.py), defaults = DiT
        self.x_embedder = PatchEmbed(in_channels, hidden, patch_size, pe_grid, pe_base or input_size // patch_size,
                                     pe_scale, pe_max)
        self.t_embedder = TimestepEmbedder(hidden, freq_shift=t_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden) if num_classes is not None else None
        # class_tokens > 1: the class embedding becomes k context tokens told apart by learned offsets. Needed where
        # the class is the only context of a cross-attention (PixArt): softmax over one key is 1, queries would be dead.
        self.class_pos = nn.Parameter(torch.zeros(class_tokens, hidden)) if num_classes and class_tokens > 1 else None
        # Eq. 1 control embedding (crop / size / flip), added to the timestep embedding that feeds adaLN; schedule_scale
        # (the run's --schedule-scale, Eq. 3) is read only by the 'step' gamma_c, which thresholds sigma_t
        self.c_embedder = ControlEmbedder(hidden, tuple(control), gamma, gamma_alpha, gamma_step_sigma,
                                          schedule_scale) if control else None
        self.final_layer = FinalLayer(hidden, patch_size, in_channels, single_final)

    def embed_t(self, t, cond):
        """adaLN conditioning vector: timestep embedding + control embedding (Eq. 1), (B, D)."""
        c = self.t_embedder(t)
        if self.c_embedder is not None and cond.get("phi") is not None:
            c = c + self.c_embedder(cond["phi"], t, cond.get("keep_ctrl"))
        return c

    def class_context(self, y):
        """Class embedding (B, D) -> context tokens (B, k, D) for attention-based class conditioning."""
        return y[:, None] if self.class_pos is None else y[:, None] + self.class_pos

    def unpatchify(self, x, h, w):
        p = self.patch_size
        C = x.shape[-1] // (p * p)
        x = x.view(x.shape[0], h, w, p, p, C)  # (B, h, w, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], C, h * p, w * p)  # (B, C, H, W)

    def output(self, x, c, h, w):
        """Image tokens (B, N, D) -> eps (B, C, H, W): final adaLN + linear, then unpatchify."""
        return self.unpatchify(self.final_layer(x, c), h, w)

    @torch.no_grad()
    def init_weights(self):
        """DiT's init; zero adaLN so every block starts as the identity, zero the output so a fresh model says 0."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("c_embedder"):  # control keeps its own zero init
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight  # patch conv initialised like a Linear (DiT)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.class_pos is not None:
            nn.init.normal_(self.class_pos, std=0.02)
        for m in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
        for name, m in self.named_modules():
            if name.endswith("adaLN_modulation"):  # adaLN-Zero: gates (and shifts/scales) start at 0
                nn.init.zeros_(m[-1].weight)
                nn.init.zeros_(m[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)  # eps = 0 at init: exact zero output
        nn.init.zeros_(self.final_layer.linear.bias)


class DiT(_Transformer):
    """DiT with adaLN-Zero (paper §2 'DiT w/ LN'); class_in='attn' is 'Att-DiT': the class embedding is a token
    that joins the image tokens in every self-attention (q/k RMSNorm for stability, §2), adaLN then carries t + control."""

    class_in_modes = ("adaln", "attn")

    def __init__(self, *, qk_norm=None, mlp_norm_eps=LN_EPS, **kw):
        super().__init__(**kw)
        qk_norm = (self.class_in == "attn") if qk_norm is None else qk_norm
        # mlp_norm_eps: diffusers' DiT port normalises before the MLP with eps 1e-5 (DiT: 1e-6)
        self.blocks = nn.ModuleList(DiTBlock(self.hidden, self.heads, self.mlp_ratio, qk_norm,
                                             mlp_norm_eps=mlp_norm_eps) for _ in range(self.depth))
        self.init_weights()

    def forward(self, x, t, cond):
        x, (h, w) = self.x_embedder(x)  # (B, N, D)
        c = self.embed_t(t, cond)  # (B, D)
        y = self.y_embedder(cond["y"])  # (B, D)
        if self.class_in == "adaln":
            c = c + y  # DiT: class embedding added to the timestep embedding
        else:
            x = torch.cat([self.class_context(y), x], 1)  # (B, k+N, D): class token(s), no PE, in every block
        for block in self.blocks:
            x = block(x, c)
        return self.output(x[:, -h * w:], c, h, w)  # class token(s) dropped


class MDT(_Transformer):
    """mDT-v2 (MDT §3, MDTv2 code): masked latent modelling in training, asymmetric encoder / decoder with U-ViT long
    skips, side-interpolator that fills masked tokens. Deviations: fixed sin-cos PE instead of learned PE + relative
    position bias (so resolution can change and attention stays on scaled_dot_product_attention)."""

    def __init__(self, *, mask_ratio=0.3, decode_layers=None, **kw):
        super().__init__(**kw)
        D, H, r = self.hidden, self.heads, self.mlp_ratio
        # decode_layers: MDTv2's class default 4 (its S/2 script uses 6); tiny keeps 1 encoder pair + 2 decoder blocks
        self.decode_layers = decode_layers or (2 if self.depth <= 4 else 4)
        half = (self.depth - self.decode_layers) // 2
        assert half >= 1, "mdt needs depth >= decode_layers + 2"
        self.mask_ratio = mask_ratio  # training only: each step masks mask_ratio + U(0, 0.2) of the tokens (MDTv2)
        self.en_inblocks = nn.ModuleList(DiTBlock(D, H, r) for _ in range(half))
        self.en_outblocks = nn.ModuleList(DiTBlock(D, H, r, skip=True) for _ in range(half))
        self.sideblocks = nn.ModuleList([DiTBlock(D, H, r)])
        self.de_blocks = nn.ModuleList(DiTBlock(D, H, r, skip=True) for _ in range(self.decode_layers))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.init_weights()

    def init_weights(self):
        super().init_weights()
        nn.init.normal_(self.mask_token, std=0.02)

    def sample_keep(self, B, N, device, generator=None):
        """Visible tokens of a training step, (B, n_keep): mask_ratio + U(0, 0.2) of the N tokens dropped (MDTv2),
        a random subset per sample (MAE-style shuffle). Drawn on the host from `generator` (train.py passes a CPU
        generator that is a function of (seed, step, chunk); None = global RNG): n_keep is a shape, so a host draw
        needs no device sync."""
        u = torch.rand(1 + B * N, generator=generator)
        ratio = self.mask_ratio + 0.2 * float(u[0])
        keep = u[1:].view(B, N).argsort(1)[:, :max(1, int(N * (1 - ratio)))]  # (B, n_keep)
        return keep.to(device, non_blocking=True)

    def denoise(self, x, c, h, w, keep=None):
        """Encoder -> (side-interpolator if masked) -> decoder on patch tokens x (B, N, D); keep: visible tokens."""
        B, N, D = x.shape
        x_in = x  # the decoder's long skip reads the full, unmasked input tokens
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, D))  # (B, n_keep, D)
        skips = []
        for block in self.en_inblocks:
            x = block(x, c)
            skips.append(x)
        for block in self.en_outblocks:
            x = block(x, c, skip=skips.pop())
        pe = self.x_embedder.pos_embed(h, w, x.device).to(x.dtype)  # MDT adds the PE again before the decoder
        if keep is not None:  # side-interpolator: mask tokens at dropped positions, predicted from the visible ones
            full = self.mask_token.to(x.dtype).expand(B, N, D).scatter(1, keep[..., None].expand(-1, -1, D), x) + pe
            side = full
            for block in self.sideblocks:
                side = block(side, c)
            is_masked = torch.ones(B, N, 1, device=x.device, dtype=torch.bool).scatter(1, keep[..., None], False)
            x = torch.where(is_masked, side, full)  # visible tokens bypass it (MDTv2 'masked shortcut')
        else:
            x = x + pe
        for block in self.de_blocks:
            x = block(x, c, skip=x_in)
        return self.output(x, c, h, w)

    def forward(self, x, t, cond):
        """eps; in train mode (mask_ratio > 0) the pair (eps of the full input, eps of a masked copy): MDTv2 trains
        both passes at every step on the same x_t (its train_util adds the two losses; the loss sums the
        predictions' losses). Deviation: MDTv2 draws fresh noise for the masked pass, we reuse x_t."""
        x, (h, w) = self.x_embedder(x)  # (B, N, D)
        c = self.embed_t(t, cond) + self.y_embedder(cond["y"])  # (B, D)
        eps = self.denoise(x, c, h, w)  # the inference path
        if not (self.training and self.mask_ratio > 0):
            return eps
        keep = self.sample_keep(x.shape[0], x.shape[1], x.device, cond.get("mask_generator"))
        return eps, self.denoise(x, c, h, w, keep)


class PixArt(_Transformer):
    """PixArt-α (PixArt-α §2.3): adaLN-single (one t-MLP -> 6D shared by all blocks) + cross-attention to the
    projected text tokens, or to the class token in class mode (class_in='adaln' also adds it to adaLN)."""

    supports_text = True
    class_in_modes = ("adaln", "attn")

    def __init__(self, *, qk_norm=False, class_tokens=4, **kw):
        super().__init__(single_final=True, class_tokens=class_tokens, **kw)
        D, text_dim = self.hidden, kw.get("text_dim")
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))  # the single global adaLN MLP
        self.text_embedder = Mlp(text_dim, D, D) if text_dim is not None else None  # caption projection
        self.blocks = nn.ModuleList(PixArtBlock(D, self.heads, self.mlp_ratio, qk_norm) for _ in range(self.depth))
        self.init_weights()

    def init_weights(self):
        super().init_weights()
        nn.init.normal_(self.t_block[1].weight, std=0.02)  # PixArt-α: gates live in the tables, t_block is small
        for block in self.blocks:  # cross-attention starts switched off (PixArt-α init)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def forward(self, x, t, cond):
        x, (h, w) = self.x_embedder(x)  # (B, N, D)
        c = self.embed_t(t, cond)  # (B, D)
        if self.text_embedder is not None:
            ctx = self.text_embedder(cond["text"])  # (B, L, D)
        else:
            y = self.y_embedder(cond["y"])
            ctx = self.class_context(y)  # (B, k, D)
            c = c + y if self.class_in == "adaln" else c
        t6 = self.t_block(c).unflatten(1, (6, -1))  # (B, 6, D)
        for block in self.blocks:
            x = block(x, t6, ctx)
        return self.output(x, c, h, w)


class MMDiT(_Transformer):
    """mmDiT / SD3 (SD3 §4): image and context streams with separate weights joined in attention; pooled text added
    to the timestep embedding. Class mode: the class token is the context stream (class_in='adaln' also adds it to
    adaLN, class_in='attn' is the paper's choice, Tab. A4)."""

    supports_text = True
    class_in_modes = ("adaln", "attn")

    def __init__(self, *, qk_norm=True, context_weights="full", **kw):
        super().__init__(**kw)
        if context_weights not in CONTEXT_WEIGHTS:
            raise ValueError(f"context_weights must be one of {CONTEXT_WEIGHTS}, got {context_weights!r}")
        self.context_weights = context_weights
        D, text_dim, pooled_dim = self.hidden, kw.get("text_dim"), kw.get("pooled_dim")
        self.context_embedder = nn.Linear(text_dim, D) if text_dim is not None else None
        self.pooled_embedder = (nn.Sequential(nn.Linear(pooled_dim, D), nn.SiLU(), nn.Linear(D, D))
                                if pooled_dim is not None else None)
        # context_weights: "full" = SD3 (default; diffusers' SD3Transformer2DModel), "qkv" / "shared" = the lighter
        # context streams that land on the paper's Tab. A1 (run.TAB_A1)
        self.blocks = nn.ModuleList(MMDiTBlock(D, self.heads, self.mlp_ratio, qk_norm, last=i == self.depth - 1,
                                               context=context_weights) for i in range(self.depth))
        self.init_weights()

    def forward(self, x, t, cond):
        x, (h, w) = self.x_embedder(x)  # (B, N, D)
        c = self.embed_t(t, cond)  # (B, D)
        if self.context_embedder is not None:
            ctx = self.context_embedder(cond["text"])  # (B, L, D)
            if self.pooled_embedder is not None:
                c = c + self.pooled_embedder(cond["pooled"])  # SD3: pooled CLIP vector joins the t-embedding
        else:
            y = self.y_embedder(cond["y"])
            ctx = self.class_context(y)  # (B, k, D)
            c = c + y if self.class_in == "adaln" else c
        for block in self.blocks:
            x, ctx = block(x, ctx, c)
        return self.output(x, c, h, w)


class UNet(nn.Module):
    """SDXL UNet (Podell et al. 2024) with class / text semantic conditioning and the paper's control (§3.1)."""

    supports_text = True  # paper Tab. 1: UNet runs class- and text-conditional
    class_in_modes = ("attn",)  # class tokens enter through cross-attention only (LDM cin256 style)

    def __init__(self, channels=(32, 64), layers=1, depth=(0, 1), head_dim=16, class_dim=32, *, in_channels=3,
                 out_channels=None, num_classes=None, text_dim=None, pooled_dim=None, class_tokens=4, control=(),
                 gamma="cosine", gamma_alpha=8.0, gamma_step_sigma=1.0, schedule_scale=1.0, time_ids=False,
                 time_id_dim=TIME_ID_DIM, time_id_down=1, mid_depth=None):
        super().__init__()
        if (num_classes is None) == (text_dim is None):
            raise ValueError("give exactly one of num_classes (class mode) / text_dim (text mode)")
        # mid_depth: transformer layers of the mid block; None = those of the coarsest level (SDXL). SD 1.x has no
        # attention at its coarsest level but one layer in the mid block: depth=(1, 1, 1, 0), mid_depth=1.
        mid_depth = depth[-1] if mid_depth is None else mid_depth
        assert mid_depth > 0, "the mid block has cross-attention (SD 1.x and SDXL)"
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.num_classes, self.class_tokens = num_classes, class_tokens
        self.time_ids, self.time_id_dim = time_ids, time_id_dim
        self.time_id_down = time_id_down  # image pixels per input pixel (the VAE's factor, 1 in pixels): target size
        emb_dim, ctx_dim = 4 * channels[0], text_dim or class_dim  # SD: time embedding = 4 x base width
        self.t_embedder = TimestepEmbedder(emb_dim, freq_dim=channels[0])  # [cos, sin], shift 0 = SDXL's Timesteps
        add_in = (pooled_dim or 0) * (text_dim is not None) + 6 * time_id_dim * time_ids
        self.add_embedder = nn.Sequential(nn.Linear(add_in, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)) \
            if add_in else None  # SDXL "text_time": cat[pooled, Fourier(time ids)] -> MLP, added to emb
        self.y_embedder = LabelEmbedder(num_classes, class_tokens * class_dim) if num_classes else None
        self.c_embedder = ControlEmbedder(emb_dim, control, gamma, gamma_alpha, gamma_step_sigma, schedule_scale) \
            if control else None  # schedule_scale: as in _Transformer, for the 'step' gamma_c
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        n = len(channels)
        skips, c = [channels[0]], channels[0]  # widths of the skip tensors, in push order
        self.down = nn.ModuleList()
        for i, co in enumerate(channels):
            self.down.append(UNetLevel([c] + [co] * (layers - 1), co, emb_dim, ctx_dim, head_dim, depth[i],
                                   "down" if i < n - 1 else None))
            skips += [co] * layers + [co] * (i < n - 1)
            c = co
        self.mid_res = nn.ModuleList(ResBlock(c, c, emb_dim) for _ in range(2))
        self.mid_attn = SpatialTransformer(c, ctx_dim, head_dim, mid_depth)
        self.up = nn.ModuleList()
        for i, co in enumerate(reversed(channels)):
            cins = [(c if j == 0 else co) + skips.pop() for j in range(layers + 1)]  # concat with encoder skip
            self.up.append(UNetLevel(cins, co, emb_dim, ctx_dim, head_dim, depth[n - 1 - i],
                                     "up" if i < n - 1 else None))
            c = co
        self.norm_out = nn.GroupNorm(32, c, eps=1e-5)
        self.conv_out = nn.Conv2d(c, self.out_channels, 3, padding=1)
        self.init_weights()

    def init_weights(self):
        # convs/linears keep PyTorch's default init, as in LDM/SD; LabelEmbedder rows N(0, 0.02) as in DiT.
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # zero the output conv (SD's zero_module): a fresh model predicts eps = 0 exactly. The ControlEmbedder
        # zero-inits its own last layer, so control starts as a no-op.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _time_ids(self, x, cond):
        """SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in pixels, (B, 6)."""
        if cond.get("time_ids") is not None:
            return cond["time_ids"]
        phi = cond["phi"]  # (B, 5) in PHI_KEYS order
        target = torch.tensor(x.shape[-2:], device=x.device, dtype=phi.dtype) * self.time_id_down
        ids = torch.cat([phi[:, [ORIG_H, ORIG_W, CROP_TOP, CROP_LEFT]], target.expand(len(phi), 2)], dim=1)  # (B, 6)
        keep = cond.get("keep_ctrl")
        return ids if keep is None else ids * keep[:, None]  # dropped control -> zero ids

    def forward(self, x, t, cond):
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).expand(B)
        emb = self.t_embedder(t)  # (B, E)
        if self.add_embedder is not None:
            parts = [cond["pooled"]] if self.y_embedder is None else []
            if self.time_ids:
                parts.append(timestep_embedding(self._time_ids(x, cond).flatten(), self.time_id_dim).view(B, -1))
            emb = emb + self.add_embedder(torch.cat(parts, dim=1).to(emb.dtype))  # (B, E)
        if self.c_embedder is not None and cond.get("phi") is not None:
            emb = emb + self.c_embedder(cond["phi"], t, cond.get("keep_ctrl")).to(emb.dtype)
        if self.y_embedder is not None:
            ctx = self.y_embedder(cond["y"]).view(B, self.class_tokens, -1)  # (B, class_tokens, class_dim)
        else:
            ctx = cond["text"]  # (B, L, text_dim)
        h = self.conv_in(x)
        skips = [h]
        for lvl in self.down:
            for i, res in enumerate(lvl.res):
                h = res(h, emb)
                h = lvl.attn[i](h, ctx) if lvl.attn is not None else h
                skips.append(h)
            if lvl.sample is not None:
                h = lvl.sample(h)  # stride-2 conv, (B, C, ceil(H/2), ceil(W/2))
                skips.append(h)
        h = self.mid_res[1](self.mid_attn(self.mid_res[0](h, emb), ctx), emb)
        for lvl in self.up:
            for i, res in enumerate(lvl.res):
                h = res(torch.cat([h, skips.pop()], dim=1), emb)  # (B, C + C_skip, H, W) -> (B, C, H, W)
                h = lvl.attn[i](h, ctx) if lvl.attn is not None else h
            if lvl.sample is not None:  # nearest x2 to the next skip's size (= SD's upsample_size for odd sizes)
                h = lvl.sample(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- registry
MODELS = {"dit": DiT, "mdt": MDT, "pixart": PixArt, "mmdit": MMDiT, "unet": UNet}


def arch_kwargs(arch):
    """The keyword arguments MODELS[arch] takes besides its size preset (its own and its base classes')."""
    preset = set((UNET_SIZES if arch == "unet" else SIZES)["tiny"])
    return {name for c in MODELS[arch].__mro__ if "__init__" in vars(c) and c is not nn.Module
            for name, p in inspect.signature(c.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - preset


def build_model(arch, size="tiny", **kw):
    """MODELS[arch] at a SIZES (UNET_SIZES) preset, or at an explicit size dict such as {"hidden": 32, "depth": 2,
    "heads": 2} (imported reference models of no preset size, weights.diffusers_kwargs); kw: constructor keywords
    (arch_kwargs), e.g. input_size, in_channels, num_classes | text_dim + pooled_dim, class_in, control, gamma,
    pe_grid, patch_size. A keyword the architecture does not take is an error, never silently dropped: what a run
    spec says is what gets built."""
    unknown = sorted(set(kw) - arch_kwargs(arch))
    if unknown:
        raise ValueError(f"{arch} takes no {', '.join(unknown)} (it takes {', '.join(sorted(arch_kwargs(arch)))})")
    preset = size if isinstance(size, dict) else (UNET_SIZES if arch == "unet" else SIZES)[size]
    return MODELS[arch](**preset, **kw)
