"""
Weight formats of other projects, in and out: public checkpoints -> our models, and our models -> diffusers.

Import (README "Weights in and out"): import_dit_original (facebookresearch/DiT checkpoints, DiT-XL-2-256.pt / -512.pt),
import_diffusers + diffusers_kwargs (diffusers DiTTransformer2DModel / PixArtTransformer2DModel /
SD3Transformer2DModel), unet_kwargs_from_diffusers + import_diffusers_unet (SDXL-style UNet2DConditionModel).
Everything a reference computes differently from our defaults is a constructor argument of models.py, so an imported
model is rebuilt from its build_model arguments alone.

Export (transfer.py --to-diffusers): to_diffusers builds the diffusers class that computes what our model computes
(diffusers_config: its constructor keywords) and loads our weights by the import key maps read backwards (one
mapping, two directions: _diffusers_table, _DIFFUSERS_UNET_KEYS); export_blockers names each part a class lacks;
diffusers_forward and check_inputs run both models on the same random inputs.

A library file: imports data, diffusion and models only (diffusers lazily, inside the functions that need it);
transfer.py and the tests import it, never the reverse.
"""
import re

import torch

import data
import diffusion
import models

# --to-diffusers: the diffusers class of each architecture (the classes import_diffusers reads)
DIFFUSERS_CLASSES = {"dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel",
                     "mmdit": "SD3Transformer2DModel", "unet": "UNet2DConditionModel"}
# downscale_freq_shift of the timestep sin-cos each class hard-codes (diffusers' Timesteps): DiT's port uses 1,
# PixArt and SD3 use 0. Ours is a constructor argument (t_freq_shift; facebookresearch/DiT and train.py: 0).
DIFFUSERS_T_SHIFT = {"dit": 1, "pixart": 0, "mmdit": 0}
MLP_RATIO = 4.0  # every one of these diffusers classes has a 4 x hidden MLP
CONTEXT_LEN = 77  # text tokens of the export's own check input (open_clip's context length)
# the export's own output check: max |ours - diffusers| <= CHECK_TOL x max(1, max |ours|). fp32 rounding gives
# ~1e-6 of the scale (test_transfer.py bounds it by 64 ulps); a wrong map is off by about the scale.
CHECK_TOL = 1e-3
# the diffusers scheduler that reads each objective's output (diffusers' prediction_type names)
SCHEDULER_HINT = {"eps": "DDPM/DDIM scheduler, prediction_type='epsilon'", "v": "DDPM/DDIM scheduler, "
                  "prediction_type='v_prediction'", "x0": "DDPM/DDIM scheduler, prediction_type='sample'",
                  "rf": "FlowMatchEulerDiscreteScheduler (v = eps - x0)"}


# ----------------------------------------------------------------------------- weight import (reference checkpoints)
# Public weights -> our models (README "Weights in and out"). Everything a reference computes differently from our
# defaults (diffusers DiT's timestep frequencies and MLP LayerNorm eps, PixArt / SD3 PE grids) is a constructor
# argument, so an imported model is rebuilt exactly from its build_model arguments (a run spec's "model") and
# its state_dict.
def _size(hidden, depth, heads):
    """The SIZES preset of a reference's width / depth / heads, or the explicit dict (build_model takes both)."""
    want = dict(hidden=hidden, depth=depth, heads=heads)
    return next((name for name, s in models.SIZES.items() if s == want), want)


def _eps_half(w, patch_size, in_channels):
    """Rows of an output Linear ordered (p, q, c): keep c < in_channels. DiT/PixArt also predict a variance in the
    second half of the channels; the paper trains with a fixed schedule (App. C), so we keep only eps."""
    return w.view(patch_size**2, -1, *w.shape[1:])[:, :in_channels].reshape(-1, *w.shape[1:])


def _final_linear(sd, w, b, model):
    sd["final_layer.linear.weight"] = _eps_half(w, model.patch_size, model.in_channels)
    sd["final_layer.linear.bias"] = _eps_half(b, model.patch_size, model.in_channels)


def _load(model, sd):
    """Load converted weights; the only keys allowed to be missing are modules the reference does not have
    (control embedder), which keep their fresh (zero-output) init."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.startswith("c_embedder.")]
    if bad or unexpected:
        raise ValueError(f"weight import mismatch: missing {bad}, unexpected {unexpected}")
    return model


def import_dit_original(state_dict, **kw):
    """facebookresearch/DiT checkpoint (DiT-XL-2-256.pt / -512.pt raw state_dict) -> our DiT. Our key layout is
    DiT's; the stored pos_embed is dropped (we compute the same sin-cos table) and of the 8 output channels
    (eps + learned variance) we keep the eps half. kw: extra build options (e.g. control=...)."""
    sd = dict(state_dict)
    D, C, p, _ = sd["x_embedder.proj.weight"].shape
    n = int(sd.pop("pos_embed").shape[1] ** 0.5)  # tokens per side at the checkpoint's resolution
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = next(s["heads"] for s in models.SIZES.values() if s["hidden"] == D)
    model = models.build_model("dit", _size(D, depth, heads), in_channels=C, patch_size=p, input_size=n * p,
                               num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1, **kw)
    _final_linear(sd, sd.pop("final_layer.linear.weight"), sd.pop("final_layer.linear.bias"), model)
    return _load(model, sd)


# One key map per architecture, read in both directions (import_diffusers, and to_diffusers for the export):
# entries (our key, kind, diffusers keys). Kinds: "copy"; "cat": our fused Linear = diffusers' separate ones
# (q/k/v) stacked on dim 0; "swap": diffusers' AdaLayerNormContinuous emits (scale, shift), ours (shift, scale);
# "tie": diffusers' DiT gives every block its own copy of the t / class embedder, ours (as DiT) shares one;
# "eps": our output rows are the eps half of diffusers' (DiT / PixArt may also predict a variance).
def _diffusers_table(model):
    """The (our key, kind, diffusers keys) entries of a DiT / PixArt / mmDiT, built from its own state_dict keys
    (a module absent from the model, e.g. q/k norms without qk_norm, adds no entry)."""
    ours, table = model.state_dict(), []

    def put(dst, src, kind="copy"):
        """Entries of our module (or bare parameter) dst <- diffusers module(s) src."""
        srcs = [src] if isinstance(src, str) else list(src)
        if dst in ours:  # a bare parameter (scale_shift_table)
            return table.append((dst, kind, srcs))
        table.extend((f"{dst}.{p}", kind, [f"{s}.{p}" for s in srcs])
                     for p in ("weight", "bias") if f"{dst}.{p}" in ours)

    def qkv(prefix, names=("to_q", "to_k", "to_v")):
        """diffusers' separate projections that our one fused Linear stacks."""
        return [f"{prefix}.{n}" for n in names]

    put("x_embedder.proj", "pos_embed.proj")
    if isinstance(model, models.DiT):
        embs = [f"transformer_blocks.{i}.norm1.emb" for i in range(len(model.blocks))]
        put("t_embedder.mlp.0", [f"{e}.timestep_embedder.linear_1" for e in embs], "tie")
        put("t_embedder.mlp.2", [f"{e}.timestep_embedder.linear_2" for e in embs], "tie")
        put("y_embedder.embedding_table", [f"{e}.class_embedder.embedding_table" for e in embs], "tie")
        for i in range(len(model.blocks)):
            b, o = f"transformer_blocks.{i}", f"blocks.{i}"
            put(f"{o}.adaLN_modulation.1", f"{b}.norm1.linear")
            put(f"{o}.attn.qkv", qkv(f"{b}.attn1"), "cat")
            put(f"{o}.attn.proj", f"{b}.attn1.to_out.0")
            put(f"{o}.mlp.fc1", f"{b}.ff.net.0.proj")
            put(f"{o}.mlp.fc2", f"{b}.ff.net.2")
        put("final_layer.adaLN_modulation.1", "proj_out_1")
        put("final_layer.linear", "proj_out_2", "eps")
    elif isinstance(model, models.PixArt):
        put("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1")
        put("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2")
        put("t_block.1", "adaln_single.linear")
        put("text_embedder.fc1", "caption_projection.linear_1")
        put("text_embedder.fc2", "caption_projection.linear_2")
        for i in range(len(model.blocks)):
            b, o = f"transformer_blocks.{i}", f"blocks.{i}"
            put(f"{o}.scale_shift_table", f"{b}.scale_shift_table")
            put(f"{o}.attn.qkv", qkv(f"{b}.attn1"), "cat")
            put(f"{o}.attn.proj", f"{b}.attn1.to_out.0")
            put(f"{o}.cross_attn.q", f"{b}.attn2.to_q")
            put(f"{o}.cross_attn.kv", qkv(f"{b}.attn2", ("to_k", "to_v")), "cat")
            put(f"{o}.cross_attn.proj", f"{b}.attn2.to_out.0")
            put(f"{o}.mlp.fc1", f"{b}.ff.net.0.proj")
            put(f"{o}.mlp.fc2", f"{b}.ff.net.2")
        put("final_layer.scale_shift_table", "scale_shift_table")
        put("final_layer.linear", "proj_out", "eps")
    elif isinstance(model, models.MMDiT):  # SD3
        t = "time_text_embed"
        put("t_embedder.mlp.0", f"{t}.timestep_embedder.linear_1")
        put("t_embedder.mlp.2", f"{t}.timestep_embedder.linear_2")
        put("pooled_embedder.0", f"{t}.text_embedder.linear_1")
        put("pooled_embedder.2", f"{t}.text_embedder.linear_2")
        put("context_embedder", "context_embedder")
        for i, block in enumerate(model.blocks):
            b, o = f"transformer_blocks.{i}", f"blocks.{i}"
            x, c, last = f"{o}.x_stream", f"{o}.c_stream", block.c_stream.pre_only
            put(f"{x}.adaLN_modulation.1", f"{b}.norm1.linear")
            put(f"{x}.attn.qkv", qkv(f"{b}.attn"), "cat")
            put(f"{x}.attn.proj", f"{b}.attn.to_out.0")
            put(f"{x}.mlp.fc1", f"{b}.ff.net.0.proj")
            put(f"{x}.mlp.fc2", f"{b}.ff.net.2")
            put(f"{c}.adaLN_modulation.1", f"{b}.norm1_context.linear", "swap" if last else "copy")
            # the last block's context stream only feeds keys / values: diffusers' context queries there are unused
            put(f"{c}.attn.qkv", qkv(f"{b}.attn", ("add_k_proj", "add_v_proj") if last else
                                     ("add_q_proj", "add_k_proj", "add_v_proj")), "cat")
            for ours_norm, theirs in ((x, "norm_q"), (x, "norm_k"), (c, "norm_added_q"), (c, "norm_added_k")):
                put(f"{ours_norm}.attn.{theirs[-1]}_norm", f"{b}.attn.{theirs}")  # present with qk_norm only
            put(f"{c}.attn.proj", f"{b}.attn.to_add_out")
            put(f"{c}.mlp.fc1", f"{b}.ff_context.net.0.proj")
            put(f"{c}.mlp.fc2", f"{b}.ff_context.net.2")
        put("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
        put("final_layer.linear", "proj_out", "eps")
    else:
        raise ValueError(f"no diffusers key map for {type(model).__name__}")
    return table


def _swap_halves(v):
    """(a, b) -> (b, a) along dim 0: diffusers' (scale, shift) <-> our (shift, scale)."""
    return torch.cat(v.chunk(2)[::-1])


def _from_diffusers(entry, sd, model):
    """Our tensor of one table entry, from the diffusers state_dict sd (import direction)."""
    _, kind, srcs = entry
    vs = [sd[s] for s in srcs]
    if kind == "tie":
        for s, v in zip(srcs[1:], vs[1:]):
            if not torch.equal(v, vs[0]):
                raise ValueError(f"{s} differs from block 0: our DiT shares one t/class embedder (as DiT does)")
    if kind == "cat":
        return torch.cat(vs)
    if kind == "swap":
        return _swap_halves(vs[0])
    if kind == "eps":
        return _eps_half(vs[0], model.patch_size, model.in_channels)
    return vs[0]  # copy, tie


def _to_diffusers(entry, v):
    """{diffusers key: tensor} of one table entry from our tensor v (export direction; the export writes
    out_channels = in_channels, so "eps" rows go over as they are)."""
    _, kind, dsts = entry
    if kind == "cat":
        return dict(zip(dsts, (p.clone() for p in v.chunk(len(dsts)))))
    if kind == "swap":
        return {dsts[0]: _swap_halves(v)}
    return {d: v.clone() for d in dsts}  # copy, tie (one copy per block), eps


def diffusers_kwargs(ref, **kw):
    """build_model arguments (a run spec's "model": arch, size, constructor keywords) of our model that computes
    what a diffusers DiTTransformer2DModel / PixArtTransformer2DModel / SD3Transformer2DModel computes.
    kw: extra build options (e.g. control=...)."""
    cfg, name = ref.config, type(ref).__name__
    base = dict(size=_size(cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers, cfg.num_attention_heads),
                in_channels=cfg.in_channels, patch_size=cfg.patch_size, input_size=cfg.sample_size)
    if name == "DiTTransformer2DModel":
        # diffusers embeds t with downscale_freq_shift=1 and normalises before the MLP with norm3 (eps 1e-5):
        # neither is a weight, both are constructor arguments
        return dict(base, arch="dit", num_classes=cfg.num_embeds_ada_norm, t_freq_shift=1,
                    mlp_norm_eps=ref.transformer_blocks[0].norm3.eps, **kw)
    if name == "PixArtTransformer2DModel":
        if ref.use_additional_conditions:  # PixArt-α 1024 resolution/aspect embedders: not part of this study
            raise ValueError("PixArt with use_additional_conditions (resolution embedding) is not supported")
        # positions / interpolation_scale
        return dict(base, arch="pixart", text_dim=cfg.caption_channels, pe_scale=ref.pos_embed.interpolation_scale,
                    **kw)
    if name == "SD3Transformer2DModel":
        width = cfg.num_attention_heads * cfg.attention_head_dim
        if cfg.dual_attention_layers or cfg.caption_projection_dim != width or cfg.qk_norm not in (None, "rms_norm"):
            raise ValueError("only SD3.0-style transformers (no dual attention, context width = hidden) are supported")
        # SD3 PE: a pos_embed_max_size grid with positions arange(M) * base / M, centre-cropped to the input
        M = cfg.pos_embed_max_size
        return dict(base, arch="mmdit", text_dim=cfg.joint_attention_dim, pooled_dim=cfg.pooled_projection_dim,
                    qk_norm=cfg.qk_norm == "rms_norm", pe_max=M, pe_scale=M / ref.pos_embed.base_size, **kw)
    raise ValueError(f"no importer for {name}")


def import_diffusers(ref, **kw):
    """Build our model matching a diffusers DiTTransformer2DModel / PixArtTransformer2DModel / SD3Transformer2DModel
    (models.build_model(**diffusers_kwargs(ref))) and copy its weights. Returns the model (fp32, train mode)."""
    model, sd = models.build_model(**diffusers_kwargs(ref, **kw)), ref.state_dict()
    out = {e[0]: _from_diffusers(e, sd, model) for e in _diffusers_table(model)}
    return _load(model, {k: v.float() for k, v in out.items()})


# diffusers UNet2DConditionModel key -> ours (regex, applied in order)
_DIFFUSERS_UNET_KEYS = [
    (r"^time_embedding\.linear_([12])", lambda m: f"t_embedder.mlp.{2 * int(m[1]) - 2}"),
    (r"^add_embedding\.linear_([12])", lambda m: f"add_embedder.{2 * int(m[1]) - 2}"),
    (r"^(down|up)_blocks\.", r"\1."), (r"^mid_block\.resnets\.", "mid_res."),
    (r"^mid_block\.attentions\.0\.", "mid_attn."),
    (r"\.resnets\.", ".res."), (r"\.attentions\.", ".attn."), (r"\.(down|up)samplers\.0\.conv\.", ".sample."),
    (r"\.time_emb_proj\.", ".emb_proj."), (r"\.conv_shortcut\.", ".skip."), (r"\.transformer_blocks\.", ".blocks."),
    (r"\.to_([qkv])\.", r".\1."), (r"\.to_out\.0\.", ".out."),
    (r"\.ff\.net\.0\.proj\.", ".ff_in."), (r"\.ff\.net\.2\.", ".ff_out."),
    (r"^conv_norm_out\.", "norm_out."),
]


def _unet_key(k):
    """Our UNet's key of a diffusers UNet2DConditionModel key (_DIFFUSERS_UNET_KEYS; the export reads it backwards)."""
    for pat, rep in _DIFFUSERS_UNET_KEYS:
        k = re.sub(pat, rep, k)
    return k


def unet_kwargs_from_diffusers(config):
    """UNet(...) kwargs that reproduce an SDXL- or SD 1.x-style diffusers UNet2DConditionModel config (text mode)."""
    channels = tuple(config["block_out_channels"])
    heads = config["num_attention_heads"] or config["attention_head_dim"]  # SDXL's 'attention_head_dim' = #heads
    heads = [heads] * len(channels) if isinstance(heads, int) else heads
    depth = config["transformer_layers_per_block"]
    depth = [depth] * len(channels) if isinstance(depth, int) else depth
    mid_depth = depth[-1]  # diffusers' mid block has the coarsest level's layers even where that level has none (SD 1.x)
    depth = tuple(d * ("CrossAttn" in b) for d, b in zip(depth, config["down_block_types"]))
    text_dim, time_ids = config["cross_attention_dim"], config["addition_embed_type"] == "text_time"
    tid = config["addition_time_embed_dim"] or models.TIME_ID_DIM
    assert len({c // h for c, h in zip(channels, heads)}) == 1, "one head width across levels expected"
    return dict(channels=channels, layers=config["layers_per_block"], depth=depth, mid_depth=mid_depth,
                head_dim=channels[0] // heads[0],
                in_channels=config["in_channels"], out_channels=config["out_channels"], text_dim=text_dim,
                pooled_dim=config["projection_class_embeddings_input_dim"] - 6 * tid if time_ids else None,
                time_ids=time_ids, time_id_dim=tid, time_id_down=data.VAE_DOWN)  # SDXL runs on SD-VAE latents


def import_diffusers_unet(model, diffusers_unet):
    """Load a diffusers UNet2DConditionModel (SDXL config, addition_embed_type="text_time") into `model`, built with
    unet_kwargs_from_diffusers(config) (+ control=... if wanted). Only our control embedder may be missing: it keeps
    its zero init, so the imported model computes exactly what diffusers does."""
    return _load(model, {_unet_key(k): v for k, v in diffusers_unet.state_dict().items()})


# ----------------------------------------------------------------------------- weight export (diffusers)
# Our model -> the diffusers class that computes the same function, written by that class's own save_pretrained
# (config.json + diffusion_pytorch_model.safetensors). The import key maps above are read backwards (one mapping,
# two directions); a part the class lacks is refused in one line before anything is written.
def _grid(spec):
    """(C, H) of the model's input at the run's resolution (square; transformers: the size they were built for)."""
    C, H, _ = data.latent_shape(spec["latent"], spec["data"]["resolution"])
    return C, spec["model"].get("input_size", H)


def export_blockers(model, spec):
    """(what our model has, the part the diffusers class lacks) for everything that stops an exact export; [] when
    the class computes what the model computes."""
    m, arch = spec["model"], spec["model"]["arch"]
    cls, out = DIFFUSERS_CLASSES[arch], []
    if getattr(model, "c_embedder", None) is not None:
        out.append((f"--control {' '.join(m['control'])}", "control conditioning"))
    if arch == "dit":
        if model.class_in == "attn":
            out.append(("--class-in attn", "class token in attention"))
    elif model.y_embedder is not None:
        out.append(("--semantic class", f"class labels: {cls} is text-conditional"))
    if arch == "mmdit" and model.y_embedder is None and model.pooled_embedder is None:
        out.append(("text without a pooled embedding", "pooled text projection"))
    if arch == "unet":
        return out
    if arch in ("dit", "pixart") and model.blocks[0].attn.k_norm is not None:
        out.append(("qk_norm", "q/k RMSNorm"))
    if arch == "mmdit" and model.context_weights != "full":
        out.append((f"--context-weights {model.context_weights}", "a context stream with weights of its own (SD3's "
                    "full stream: --context-weights full)"))
    if model.mlp_ratio != MLP_RATIO:
        out.append((f"mlp_ratio {model.mlp_ratio:g}", f"MLP width ({MLP_RATIO:g} x hidden in {cls})"))
    shift = model.t_embedder.freq_shift
    if shift != DIFFUSERS_T_SHIFT[arch]:
        out.append((f"t_freq_shift {shift}", f"timestep frequencies: {cls} embeds t with downscale_freq_shift="
                                             f"{DIFFUSERS_T_SHIFT[arch]}"))
    return out + _pe_blockers(model, spec)


def _pe_config(model, spec):
    """The config entries that place a diffusers class's patch positions where ours are at the native grid n:
    DiT arange(n); PixArt arange(n) / interpolation_scale; SD3 the centre n of arange(M) * base / M
    (base = sample_size / patch)."""
    arch, p = spec["model"]["arch"], model.patch_size
    size = _grid(spec)[1]
    if arch == "dit":
        return dict(sample_size=size)
    axis = model.x_embedder.axis(size // p)
    if arch == "pixart":
        step = float(axis[1] - axis[0]) if len(axis) > 1 else 1.0
        return dict(sample_size=size, interpolation_scale=1 / step)
    M = model.x_embedder.pe_max or size // p
    return dict(sample_size=round(M / model.x_embedder.pe_scale) * p, pos_embed_max_size=M)


def _pe_blockers(model, spec):
    """[] when diffusers' own PatchEmbed (built as the class builds it) gives our PE at the native grid. Both sides
    round a float64 table to fp32; diffusers computes positions in fp32 first: a few ulps of the largest argument."""
    from diffusers.models.embeddings import PatchEmbed

    arch, p, (C, size) = spec["model"]["arch"], model.patch_size, _grid(spec)
    cfg, n = _pe_config(model, spec), size // p
    pe = PatchEmbed(height=cfg["sample_size"], width=cfg["sample_size"], patch_size=p, in_channels=C,
                    embed_dim=model.hidden, interpolation_scale=cfg.get("interpolation_scale", 1),
                    pos_embed_max_size=cfg.get("pos_embed_max_size"))
    theirs = pe.cropped_pos_embed(size, size) if arch == "mmdit" else pe.pos_embed
    ours, axis = model.x_embedder.pos_embed(n, n, torch.device("cpu")), model.x_embedder.axis(n)
    tol = 8 * torch.finfo(torch.float32).eps * (1 + float(axis.abs().max()))
    if ours.shape == theirs.shape and (ours - theirs).abs().max() <= tol:
        return []
    where = ", ".join(f"{float(v):.4g}" for v in axis[:3]) + f", ..., {float(axis[-1]):.4g}"
    return [(f"--pe-grid {model.x_embedder.pe_grid}", f"PE grid: patch positions {where} are no grid of "
             f"diffusers' PatchEmbed")]


def diffusers_config(model, spec):
    """The diffusers class's config (its constructor keywords) for our model; the inverse of diffusers_kwargs /
    unet_kwargs_from_diffusers. Only for a model without export_blockers."""
    arch = spec["model"]["arch"]
    if arch == "unet":
        return _unet_config(model, spec)
    C, D = model.in_channels, model.hidden
    cfg = dict(num_attention_heads=model.heads, attention_head_dim=D // model.heads, in_channels=C, out_channels=C,
               num_layers=model.depth, patch_size=model.patch_size, **_pe_config(model, spec))
    if arch == "dit":  # eps of the MLP LayerNorm = diffusers' norm_eps (its port uses 1e-5, DiT 1e-6)
        return dict(cfg, num_embeds_ada_norm=model.y_embedder.num_classes, norm_eps=model.blocks[0].norm2.eps)
    if arch == "pixart":  # use_additional_conditions would switch itself on at sample_size 128
        return dict(cfg, caption_channels=model.text_embedder.fc1.in_features, cross_attention_dim=D,
                    use_additional_conditions=False)
    qk = model.blocks[0].x_stream.attn.k_norm is not None
    return dict(cfg, joint_attention_dim=model.context_embedder.in_features, caption_projection_dim=D,
                pooled_projection_dim=model.pooled_embedder[0].in_features, qk_norm="rms_norm" if qk else None)


def _unet_config(model, spec):
    """UNet2DConditionModel config of our (text-mode) UNet, SDXL style: linear projections, GEGLU, text_time."""
    chans = tuple(lvl.res[0].conv1.out_channels for lvl in model.down)
    depth = tuple(len(lvl.attn[0].blocks) if lvl.attn is not None else 0 for lvl in model.down)
    block = model.mid_attn.blocks[0]
    head_dim = chans[-1] // block.attn1.heads
    cfg = dict(sample_size=_grid(spec)[1], in_channels=model.in_channels, out_channels=model.out_channels,
               layers_per_block=len(model.down[0].res), block_out_channels=chans, norm_num_groups=32,
               down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth),
               up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)),
               attention_head_dim=tuple(c // head_dim for c in chans),  # SDXL's name for the head count
               transformer_layers_per_block=tuple(max(d, 1) for d in depth),  # a level without attention ignores it
               cross_attention_dim=block.attn2.k.in_features, use_linear_projection=True)
    if model.add_embedder is not None:
        # "text_time" = cat[pooled, Fourier(6 time ids)] -> MLP. Without our time ids the Fourier columns of
        # linear_1 are zero (_unet_state_dict): the exported model ignores the time_ids it is given, as ours does.
        tid = model.time_id_dim
        pooled = model.add_embedder[0].in_features - 6 * tid * model.time_ids
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=tid,
                   projection_class_embeddings_input_dim=pooled + 6 * tid)
    return cfg


def _unet_state_dict(model, ref):
    """(diffusers state_dict, our keys left over) by _unet_key read backwards."""
    ours, names = model.state_dict(), {_unet_key(k): k for k in ref.state_dict()}
    sd = {names[k]: v.clone() for k, v in ours.items() if k in names}
    w = sd.get("add_embedding.linear_1.weight")
    if w is not None and not model.time_ids:  # zero Fourier(time id) columns: see _unet_config
        sd["add_embedding.linear_1.weight"] = torch.cat([w, w.new_zeros(w.shape[0], 6 * model.time_id_dim)], 1)
    return sd, [k for k in ours if k not in names]


def _transformer_state_dict(model):
    """(diffusers state_dict, our keys left over) by _diffusers_table read backwards."""
    ours, table, sd = model.state_dict(), _diffusers_table(model), {}
    for entry in table:
        sd.update(_to_diffusers(entry, ours[entry[0]]))
    covered = {e[0] for e in table}
    return sd, [k for k in ours if k not in covered]


def _unset_ok(arch, ref):
    """diffusers keys the export leaves as the class builds them: SD3's stored PE table (computed from the config,
    compared by _pe_blockers) and, in its last block, context queries whose outputs SD3 discards (context_pre_only)."""
    if arch != "mmdit":
        return set()
    last = f"transformer_blocks.{len(ref.transformer_blocks) - 1}.attn"
    return {"pos_embed.pos_embed"} | {k for k in ref.state_dict() if k.startswith((f"{last}.add_q_proj.",
                                                                                   f"{last}.norm_added_q."))}


def to_diffusers(model, spec):
    """The diffusers model (eval mode, fp32) that computes what `model` computes, built from diffusers_config and
    loaded with our weights. A part the class lacks stops it: one-line SystemExit naming each such part."""
    import diffusers

    arch, where = spec["model"]["arch"], "transfer.py --to-diffusers"
    if arch not in DIFFUSERS_CLASSES:
        raise SystemExit(f"{where}: {arch} has no diffusers counterpart (exports: {', '.join(DIFFUSERS_CLASSES)})")
    cls, blockers = DIFFUSERS_CLASSES[arch], export_blockers(model, spec)
    if blockers:
        raise SystemExit(f"{where}: {arch} with {', '.join(w for w, _ in blockers)} has no {cls} counterpart "
                         f"({'; '.join(p for _, p in blockers)})")
    ref = getattr(diffusers, cls)(**diffusers_config(model, spec))
    sd, left = _unet_state_dict(model, ref) if arch == "unet" else _transformer_state_dict(model)
    if left:  # a part export_blockers does not know yet
        raise SystemExit(f"{where}: {arch} parameters with no {cls} counterpart: {', '.join(left[:6])}")
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    unset = sorted(set(missing) - _unset_ok(arch, ref))
    if unset or unexpected:
        raise RuntimeError(f"export key map incomplete: {cls} keys unset {unset}, unknown {unexpected}")
    return ref.eval()


def diffusers_forward(ref, x, t, cond):
    """A diffusers model's output for our inputs (x, t, cond as models.py's interface): what each class takes."""
    name = type(ref).__name__
    if name == "DiTTransformer2DModel":
        return ref(x, timestep=t, class_labels=cond["y"]).sample
    if name == "PixArtTransformer2DModel":
        return ref(x, encoder_hidden_states=cond["text"], timestep=t,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    if name == "SD3Transformer2DModel":
        return ref(x, encoder_hidden_states=cond["text"], pooled_projections=cond["pooled"], timestep=t).sample
    added = None
    if ref.config.addition_embed_type == "text_time":  # time ids: ours, or zeros that the export ignores
        added = {"text_embeds": cond["pooled"], "time_ids": cond.get("time_ids", x.new_zeros(len(x), 6))}
    return ref(x, t, encoder_hidden_states=cond["text"], added_cond_kwargs=added).sample


def check_inputs(model, spec, batch=1, seed=0):
    """(x, t, cond) of the run's shape and conditioning, random (seeded): what the export compares outputs on."""
    g = torch.Generator().manual_seed(seed)
    C, H = _grid(spec)
    x, t, sem = torch.randn(batch, C, H, H, generator=g), torch.randint(0, diffusion.T, (batch,), generator=g), \
        spec["semantic"]
    if sem["kind"] == "class":
        return x, t, {"y": torch.randint(0, sem["num_classes"] + 1, (batch,), generator=g)}  # null row included
    cond = {"text": torch.randn(batch, CONTEXT_LEN, sem["dim"], generator=g)}
    if sem.get("pooled_dim"):
        cond["pooled"] = torch.randn(batch, sem["pooled_dim"], generator=g)
    if getattr(model, "time_ids", False):  # SDXL micro-conditioning in pixels: original size, crop, target size
        side = float(H * (spec["latent"]["down"] or 1))
        cond["time_ids"] = torch.tensor([[side, side, 0.0, 0.0, side, side]]).expand(batch, 6)
    return x, t, cond
