r"""
Transfer a checkpoint to a new resolution or dataset (paper §2.2, §3.4; SPEC §7). Writes a train.py-style
checkpoint (model = ema = transferred weights, step 0, the updated run spec) that `train.py --init-from` fine-tunes
from and sample.py / evaluate.py load directly; prints exactly which keys were kept / re-initialised / dropped.

    python transfer.py --ckpt out/in1k256/ckpt.pt --resolution 512 --out out/in1k512_init.pt        # r -> r'
    python transfer.py --make-class-map --old-classes /data/imagenet/train \
        --new-classes /data/imagenet22k/train --out out/in1k_to_in22k.json                           # the 1k -> 22k map
    python transfer.py --ckpt out/in1k256/ckpt.pt --num-classes 21841 --class-map out/in1k_to_in22k.json \
        --out out/in22k_init.pt                                                                      # 1k -> 22k
    python transfer.py --ckpt out/in1k256/ckpt.pt --to-text --out out/cc12m_init.pt                  # class -> text
    python train.py <pre-training flags> --init-from out/in1k512_init.pt <the flags transfer.py prints>

Resolution r -> r': the model is rebuilt at r' with PE grid `resample` (positions linspace(0, n_base, n): every
resolution spans the pre-training range, App. C Pseudocode 1) or `extrapolate` (arange(n)); the schedule scale
becomes s * r'/r (Eq. 3, used for training and sampling) and the guidance default follows Eq. 4 with the factor
r'/r_pretrain (lam = 1 + 2 (1.5 - 1) = 2.0 at 512 from 1.5 at 256; r_pretrain is recorded as base_resolution).
Positional embeddings are computed, not stored, so every weight is kept. Dataset: 1k -> 22k extends the class
table (old ids keep their rows, or move by --class-map, the null row moves to the end, new rows are fresh);
class -> text keeps every backbone tensor and replaces the semantic embedder (label table dropped, text/pooled
projections fresh). --make-class-map writes that map: old class i -> the index of its WordNet id among the new
classes, where either side is an ImageFolder root (class ids = sorted folder names, as data.ImageFolderDataset
numbers them) or a text file of wnids in class-id order, one per line (ImageNet-21k's wnid list; only a line's
first word counts, so LOC_synset_mapping.txt works too). A map that misses classes is refused in one line.

Library part (tests and users import it): the transfers above, and weight import from public checkpoints:
import_dit_original (facebookresearch/DiT), import_diffusers + diffusers_kwargs (diffusers DiT / PixArt-α / SD3
transformers), unet_kwargs_from_diffusers + import_diffusers_unet (SDXL-style UNet2DConditionModel).
"""
import argparse
import collections
import copy
import json
import os
import re

import torch

import conditioning
import data
import models
import run

TABLE = "y_embedder.embedding_table.weight"  # the class table (num_classes + 1 rows, last = null)


def carry_over(model, sd, reinit=()):
    """Copy every tensor of sd whose name and shape match the new model (except names in reinit); the rest
    of the new model keeps its fresh init_weights() values. Returns (state_dict, report)."""
    new = model.state_dict()
    report = {"kept": [], "reinitialised": [], "dropped": sorted(k for k in sd if k not in new)}
    for k, v in new.items():
        if k in sd and sd[k].shape == v.shape and k not in reinit:
            new[k] = sd[k].clone()
            report["kept"].append(k)
        else:
            report["reinitialised"].append(k)
    report["dropped"] += sorted(k for k in sd if k in new and sd[k].shape != new[k].shape and k not in reinit)
    return new, report


def _fmt(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def transfer_resolution(spec, sd, resolution, pe_grid="resample"):
    """Resolution r -> r' (§2.2): (new spec, weights, report, train.py flags). The schedule scale multiplies by
    r'/r (Eq. 3); transformers keep their positions spanning the pre-training grid [0, pe_base]."""
    b, m = copy.deepcopy(spec), spec["model"]
    factor = resolution / spec["data"]["resolution"]
    b["data"]["resolution"] = resolution
    b["schedule"]["scale"] = spec["schedule"]["scale"] * factor
    if "schedule_scale" in m:  # the 'step' gamma_c thresholds the sigma of this schedule
        b["model"]["schedule_scale"] = b["schedule"]["scale"]
    flags = {"--resolution": resolution}
    if "input_size" in m:  # transformers: patch grid of the source run, positions computed at r'
        b["model"]["input_size"] = round(m["input_size"] * factor)
        b["model"]["pe_grid"] = pe_grid
        b["model"]["pe_base"] = m.get("pe_base") or m["input_size"] // m.get("patch_size", 2)
        if pe_grid != m.get("pe_grid"):
            flags["--pe-grid"] = pe_grid
        flags["--pe-base"] = b["model"]["pe_base"]
    flags["--schedule-scale"] = b["schedule"]["scale"]
    # Eq. 4's s = r' / r_pretrain for every arch (the UNet has no PE grid to read it from)
    b["data"]["base_resolution"] = flags["--base-resolution"] = spec["data"].get("base_resolution") or \
        spec["data"]["resolution"]
    new, report = carry_over(models.build_model(**b["model"]), sd)
    report["guidance_lam"] = run.default_lam(b)  # Eq. 4: what evaluate.py will use at r'
    return b, new, report, flags


def read_class_names(path, flag):
    """Class names in class-id order: an ImageFolder root's class folders, sorted (the rule of
    data.ImageFolderDataset, without listing every image), or a text file's first word per non-blank line."""
    if os.path.isdir(path):
        names = sorted(d.name for d in os.scandir(path) if d.is_dir())
    elif os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                names = [line.split()[0] for line in f if line.strip()]
        except UnicodeDecodeError:
            raise SystemExit(f"{flag} {path}: not a text file (expected one wnid per line)") from None
    else:
        raise SystemExit(f"{flag} {path}: not found (an ImageFolder root or a text file of wnids, one per line)")
    if not names:
        raise SystemExit(f"{flag} {path}: no classes in it (no class folders / no non-blank lines)")
    dup = sorted(n for n, k in collections.Counter(names).items() if k > 1)
    if dup:
        raise SystemExit(f"{flag} {path}: {len(dup)} class names appear twice, so their id is ambiguous "
                         f"(first: {', '.join(dup[:5])})")
    return names


def make_class_map(old, new, old_flag="--old-classes", new_flag="--new-classes"):
    """(class map, new class count): old class i -> the new id of the same name. old / new: paths of the two class
    lists (ImageFolder root or wnid file, see read_class_names); every old class must be among the new ones."""
    old_names, new_names = read_class_names(old, old_flag), read_class_names(new, new_flag)
    index = {n: i for i, n in enumerate(new_names)}
    missing = [n for n in old_names if n not in index]
    if missing:
        raise SystemExit(f"{new_flag} {new}: {len(missing)} of the {len(old_names)} classes of {old_flag} {old} are "
                         f"missing from it (first: {', '.join(missing[:5])})")
    return [index[n] for n in old_names], len(new_names)


def check_class_map(class_map, n_old, num_classes, where="--class-map"):
    """One-line refusal (naming `where`) unless class_map gives each of the n_old classes its own new id in
    [0, num_classes): a short map would leave classes behind, a shared row would merge two classes."""
    if not isinstance(class_map, list):
        raise SystemExit(f"{where}: expected a JSON list (the new class id of each old class), "
                         f"got a {type(class_map).__name__}")
    if len(class_map) != n_old:
        raise SystemExit(f"{where}: {len(class_map)} entries, but the checkpoint has {n_old} classes "
                         "(one new id per old class)")
    seen = {}
    for i, v in enumerate(class_map):
        if not isinstance(v, int) or isinstance(v, bool):  # JSON true/1.5/"3" are not class ids
            raise SystemExit(f"{where}: entry {i} is {v!r}, not an integer class id")
        if not 0 <= v < num_classes:
            raise SystemExit(f"{where}: entry {i} is {v}, outside [0, --num-classes {num_classes})")
        if v in seen:
            raise SystemExit(f"{where}: old classes {seen[v]} and {i} both map to new id {v} "
                             "(each old class needs its own row)")
        seen[v] = i


def transfer_classes(spec, sd, num_classes, class_map=None, where="--class-map"):
    """ImageNet-1k -> 22k (§3.4): extend the class table. Old class i goes to row class_map[i] (identity by
    default), the null row to the new last row; rows no old class lands on keep their fresh init. A bad map
    is refused in one line naming `where` (the flag and file it came from) before anything is built."""
    if spec["semantic"]["kind"] != "class":
        raise SystemExit("--num-classes needs a class-conditional checkpoint")
    n_old = sd[TABLE].shape[0] - 1  # the last row is the null class
    if class_map is None:
        if num_classes < n_old:
            raise SystemExit(f"--num-classes {num_classes} is fewer than the checkpoint's {n_old} classes: "
                             "give a --class-map")
        class_map = list(range(n_old))
    check_class_map(class_map, n_old, num_classes, where)
    b = copy.deepcopy(spec)
    b["semantic"].update(num_classes=num_classes, null_id=num_classes)
    b["model"]["num_classes"] = num_classes
    new, report = carry_over(models.build_model(**b["model"]), sd, reinit=(TABLE,))
    old, table = sd[TABLE], new[TABLE].clone()  # (n_old + 1, D), (n_new + 1, D)
    table[class_map] = old[:n_old]
    table[num_classes] = old[n_old]  # null row
    new[TABLE] = table
    report["reinitialised"].remove(TABLE)
    report["kept"].append(f"{TABLE}[{n_old} class rows + null row]")
    report["reinitialised"].append(f"{TABLE}[{num_classes - n_old} new class rows]")
    return b, new, report, {"--num-classes": num_classes}


def transfer_to_text(spec, sd, text_encoder="ViT-L-14", text_encoder_path="openai", text_pad="noisy", beta_txt=0.02):
    """ImageNet-1k -> CC12M (§3.4): keep the backbone, replace the semantic embedder (class table -> text)."""
    if spec["semantic"]["kind"] != "class":
        raise SystemExit("--to-text needs a class-conditional checkpoint")
    enc = conditioning.get_text_encoder(text_encoder, text_encoder_path, flag="--text-encoder-path")  # its widths
    b = copy.deepcopy(spec)
    b["semantic"] = dict(kind="text", encoder=text_encoder, pretrained=text_encoder_path, pad=text_pad,
                         beta_txt=beta_txt, dim=enc.dim, pooled_dim=enc.pooled_dim)
    m = b["model"]
    m.pop("num_classes")
    m.pop("class_in", None)  # train.py drops the class flags in text mode
    if not models.MODELS[m["arch"]].supports_text:
        raise SystemExit(f"--to-text: {m['arch']} is class-conditional only (paper Tab. 1)")
    m.update(text_dim=enc.dim, pooled_dim=enc.pooled_dim)
    new, report = carry_over(models.build_model(**m), sd)
    flags = {"--semantic": "text", "--text-encoder": text_encoder, "--text-encoder-path": text_encoder_path,
             "--text-pad": text_pad, "--beta-txt": beta_txt}
    return b, new, report, flags


# ----------------------------------------------------------------------------- weight import (reference checkpoints)
# Public weights -> our models (README "Weight import"). Everything a reference computes differently from our
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


def _qkv(sd, prefix, names=("to_q", "to_k", "to_v")):
    """Fuse diffusers' separate q/k/v Linears into our one qkv Linear."""
    return {p: torch.cat([sd[f"{prefix}.{n}.{p}"] for n in names]) for p in ("weight", "bias")}


def _put(out, dst, sd=None, src=None, tensors=None):
    tensors = tensors if tensors is not None else {p: sd[f"{src}.{p}"] for p in ("weight", "bias") if f"{src}.{p}" in sd}
    out.update({f"{dst}.{p}": v for p, v in tensors.items()})


def _swap(tensors):
    """diffusers' AdaLayerNormContinuous emits (scale, shift); ours emits (shift, scale)."""
    return {p: torch.cat(v.chunk(2)[::-1]) for p, v in tensors.items()}


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
    spec_model = diffusers_kwargs(ref, **kw)
    arch, model, sd, out = spec_model["arch"], models.build_model(**spec_model), ref.state_dict(), {}
    _put(out, "x_embedder.proj", sd, "pos_embed.proj")

    if arch == "dit":
        emb = [k for k in sd if ".norm1.emb." in k]  # diffusers gives every block its own t/class embedder
        for k in emb:
            if not torch.equal(sd[k], sd[k.replace(k.split(".")[1], "0", 1)]):
                raise ValueError(f"{k} differs from block 0: our DiT shares one t/class embedder (as DiT does)")
        e = "transformer_blocks.0.norm1.emb"
        _put(out, "t_embedder.mlp.0", sd, f"{e}.timestep_embedder.linear_1")
        _put(out, "t_embedder.mlp.2", sd, f"{e}.timestep_embedder.linear_2")
        out["y_embedder.embedding_table.weight"] = sd[f"{e}.class_embedder.embedding_table.weight"]
        for i in range(len(model.blocks)):
            b, o = f"transformer_blocks.{i}", f"blocks.{i}"
            _put(out, f"{o}.adaLN_modulation.1", sd, f"{b}.norm1.linear")
            _put(out, f"{o}.attn.qkv", tensors=_qkv(sd, f"{b}.attn1"))
            _put(out, f"{o}.attn.proj", sd, f"{b}.attn1.to_out.0")
            _put(out, f"{o}.mlp.fc1", sd, f"{b}.ff.net.0.proj")
            _put(out, f"{o}.mlp.fc2", sd, f"{b}.ff.net.2")
        _put(out, "final_layer.adaLN_modulation.1", sd, "proj_out_1")
        _final_linear(out, sd["proj_out_2.weight"], sd["proj_out_2.bias"], model)

    elif arch == "pixart":
        _put(out, "t_embedder.mlp.0", sd, "adaln_single.emb.timestep_embedder.linear_1")
        _put(out, "t_embedder.mlp.2", sd, "adaln_single.emb.timestep_embedder.linear_2")
        _put(out, "t_block.1", sd, "adaln_single.linear")
        _put(out, "text_embedder.fc1", sd, "caption_projection.linear_1")
        _put(out, "text_embedder.fc2", sd, "caption_projection.linear_2")
        for i in range(len(model.blocks)):
            b, o = f"transformer_blocks.{i}", f"blocks.{i}"
            out[f"{o}.scale_shift_table"] = sd[f"{b}.scale_shift_table"]
            _put(out, f"{o}.attn.qkv", tensors=_qkv(sd, f"{b}.attn1"))
            _put(out, f"{o}.attn.proj", sd, f"{b}.attn1.to_out.0")
            _put(out, f"{o}.cross_attn.q", sd, f"{b}.attn2.to_q")
            _put(out, f"{o}.cross_attn.kv", tensors=_qkv(sd, f"{b}.attn2", ("to_k", "to_v")))
            _put(out, f"{o}.cross_attn.proj", sd, f"{b}.attn2.to_out.0")
            _put(out, f"{o}.mlp.fc1", sd, f"{b}.ff.net.0.proj")
            _put(out, f"{o}.mlp.fc2", sd, f"{b}.ff.net.2")
        out["final_layer.scale_shift_table"] = sd["scale_shift_table"]
        _final_linear(out, sd["proj_out.weight"], sd["proj_out.bias"], model)

    else:  # mmdit (SD3)
        t = "time_text_embed"
        _put(out, "t_embedder.mlp.0", sd, f"{t}.timestep_embedder.linear_1")
        _put(out, "t_embedder.mlp.2", sd, f"{t}.timestep_embedder.linear_2")
        _put(out, "pooled_embedder.0", sd, f"{t}.text_embedder.linear_1")
        _put(out, "pooled_embedder.2", sd, f"{t}.text_embedder.linear_2")
        _put(out, "context_embedder", sd, "context_embedder")
        for i, block in enumerate(model.blocks):
            b, o = f"transformer_blocks.{i}", f"blocks.{i}"
            x, c, last = f"{o}.x_stream", f"{o}.c_stream", block.c_stream.pre_only
            _put(out, f"{x}.adaLN_modulation.1", sd, f"{b}.norm1.linear")
            _put(out, f"{x}.attn.qkv", tensors=_qkv(sd, f"{b}.attn"))
            _put(out, f"{x}.attn.proj", sd, f"{b}.attn.to_out.0")
            _put(out, f"{x}.mlp.fc1", sd, f"{b}.ff.net.0.proj")
            _put(out, f"{x}.mlp.fc2", sd, f"{b}.ff.net.2")
            ada = {p: sd[f"{b}.norm1_context.linear.{p}"] for p in ("weight", "bias")}
            _put(out, f"{c}.adaLN_modulation.1", tensors=_swap(ada) if last else ada)
            names = ("add_k_proj", "add_v_proj") if last else ("add_q_proj", "add_k_proj", "add_v_proj")
            _put(out, f"{c}.attn.qkv", tensors=_qkv(sd, f"{b}.attn", names))  # last: context queries unused
            if model.blocks[0].x_stream.attn.k_norm is not None:
                for ours, theirs in ((x, "norm_q"), (x, "norm_k"), (c, "norm_added_k")) + (((c, "norm_added_q"),) if not last else ()):
                    out[f"{ours}.attn.{theirs[-1]}_norm.weight"] = sd[f"{b}.attn.{theirs}.weight"]
            if not last:
                _put(out, f"{c}.attn.proj", sd, f"{b}.attn.to_add_out")
                _put(out, f"{c}.mlp.fc1", sd, f"{b}.ff_context.net.0.proj")
                _put(out, f"{c}.mlp.fc2", sd, f"{b}.ff_context.net.2")
        _put(out, "final_layer.adaLN_modulation.1", tensors=_swap({p: sd[f"norm_out.linear.{p}"] for p in ("weight", "bias")}))
        _final_linear(out, sd["proj_out.weight"], sd["proj_out.bias"], model)
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
    sd = {}
    for k, v in diffusers_unet.state_dict().items():
        for pat, rep in _DIFFUSERS_UNET_KEYS:
            k = re.sub(pat, rep, k)
        sd[k] = v
    return _load(model, sd)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # io
    p.add_argument("--ckpt", default=None, help="source checkpoint (train.py format; EMA weights are used); "
                   "required unless --make-class-map")
    p.add_argument("--out", required=True, help="where to write the transferred checkpoint (the JSON map with "
                   "--make-class-map)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh init of re-initialised tensors (default: 0)")
    # resolution transfer
    p.add_argument("--resolution", type=int, default=None, help="new resolution r' in pixels (default: keep)")
    p.add_argument("--pe-grid", choices=["resample", "extrapolate"], default="resample",
                   help="PE grid at r': resample spans the pre-training range (paper), extrapolate = arange "
                   "(default: resample)")
    # dataset transfer
    p.add_argument("--num-classes", type=int, default=None, help="extend the class table to this many classes "
                   "(ImageNet-22k: 21841)")
    p.add_argument("--class-map", default=None, help="JSON list: new class id of each old class, as "
                   "--make-class-map writes it (default: identity)")
    # class map for --class-map (ImageNet-1k -> 22k)
    p.add_argument("--make-class-map", action="store_true", help="only write the --class-map file for "
                   "--old-classes -> --new-classes to --out (no checkpoint involved)")
    p.add_argument("--old-classes", default=None, help="with --make-class-map: the checkpoint's classes, an "
                   "ImageFolder root (e.g. /data/imagenet/train) or a text file of wnids in class-id order")
    p.add_argument("--new-classes", default=None, help="with --make-class-map: the fine-tuning data's classes, same "
                   "forms (the ImageNet-22k train root, or ImageNet-21k's wnid list if it trains in that order)")
    # class -> text transfer
    p.add_argument("--to-text", action="store_true", help="class -> text: replace the semantic embedder")
    p.add_argument("--text-encoder", default="ViT-L-14", help="open_clip text tower or 'tiny' (default: ViT-L-14)")
    p.add_argument("--text-encoder-path", default="openai", help="its weights: tag or file (default: openai)")
    p.add_argument("--text-pad", default="noisy", help="text padding of the fine-tuning run (default: noisy, §2.1)")
    p.add_argument("--beta-txt", type=float, default=0.02, help="noisy padding beta (default: 0.02, Tab. 3)")
    return p


def write_class_map(args):
    """--make-class-map: the JSON map, written atomically only once every old class has been found."""
    if args.ckpt is not None or args.old_classes is None or args.new_classes is None:
        raise SystemExit("--make-class-map needs --old-classes and --new-classes and no --ckpt "
                         "(it writes only the map; pass it to a second transfer.py run as --class-map)")
    class_map, n_new = make_class_map(args.old_classes, args.new_classes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with data.atomic_write(args.out, "w") as f:
        json.dump(class_map, f)
    moved = sum(i != j for i, j in enumerate(class_map))
    print(f"class map: {len(class_map)} old classes ({args.old_classes}) -> {n_new} new classes ({args.new_classes}), "
          f"{moved} ids change; wrote {args.out}\n"
          f"next: python transfer.py --ckpt CKPT --num-classes {n_new} --class-map {args.out} --out NEW_CKPT")


def read_class_map(path):
    """The --class-map file's JSON (checked against the checkpoint by check_class_map)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"--class-map {path}: not found (python transfer.py --make-class-map writes one)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"--class-map {path}: not JSON ({e})") from None


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.make_class_map:
        return write_class_map(args)
    if args.old_classes is not None or args.new_classes is not None:
        raise SystemExit("--old-classes / --new-classes only go with --make-class-map (which writes the --class-map)")
    if args.ckpt is None:
        raise SystemExit("transfer.py: --ckpt PATH is required (or --make-class-map to write a class map)")
    if args.class_map is not None and args.num_classes is None:
        raise SystemExit("--class-map needs --num-classes (the new class count, 21841 for ImageNet-22k)")
    cmap = read_class_map(args.class_map) if args.class_map else None  # before the checkpoint: fail fast
    torch.manual_seed(args.seed)
    ck = run.read_checkpoint(args.ckpt)
    if "spec" not in ck:
        raise SystemExit(f"{args.ckpt}: no run spec in this checkpoint (written by an older train.py)")
    spec, sd = ck["spec"], ck.get("ema", ck.get("model"))  # EMA weights: what train.py --init-from prefers
    reports, flags = {}, {}
    if args.num_classes is not None:
        spec, sd, reports["classes"], f = transfer_classes(spec, sd, args.num_classes, cmap,
                                                           where=f"--class-map {args.class_map}")
        flags.update(f)
    if args.to_text:
        spec, sd, reports["text"], f = transfer_to_text(spec, sd, args.text_encoder, args.text_encoder_path,
                                                         args.text_pad, args.beta_txt)
        flags.update(f)
    if args.resolution is not None:
        spec, sd, reports["resolution"], f = transfer_resolution(spec, sd, args.resolution, args.pe_grid)
        flags.update(f)
    if not reports:
        raise SystemExit("transfer.py: nothing to do: give --resolution, --num-classes and/or --to-text")
    for name, r in reports.items():
        print(f"[{name}] kept {len(r['kept'])}, re-initialised {len(r['reinitialised'])}, dropped {len(r['dropped'])}")
        for what in ("reinitialised", "dropped"):
            for k in r[what]:
                print(f"  {what}: {k}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out = {"model": sd, "ema": sd, "spec": spec, "args": ck.get("args"), "step": 0,
           "transfer": {"from": args.ckpt, "from_step": ck.get("step"), "reports": reports,
                        "guidance_lam": run.default_lam(spec), "flags": flags}}  # train.py --init-from adopts flags
    run.save_checkpoint(out, args.out)
    cmd = " ".join(f"{k} {_fmt(v)}" for k, v in flags.items())
    print(f"wrote {args.out}\nfine-tune: python train.py <pre-training flags> --init-from {args.out} {cmd} "
          f"--out-dir NEW_DIR")


if __name__ == "__main__":
    main()
