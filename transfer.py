"""
Transfer a checkpoint to a new resolution or dataset (paper §2.2, §3.4; SPEC §7). Writes a train.py-style
checkpoint (model = ema = transferred weights, step 0, the updated run spec) that `train.py --init-from` fine-tunes
from and sample.py / evaluate.py load directly; prints exactly which keys were kept / re-initialised / dropped.

    python transfer.py --ckpt out/in1k256/ckpt.pt --resolution 512 --out out/in1k512_init.pt        # r -> r'
    python transfer.py --ckpt out/in1k256/ckpt.pt --num-classes 21841 --out out/in22k_init.pt        # 1k -> 22k
    python transfer.py --ckpt out/in1k256/ckpt.pt --to-text --out out/cc12m_init.pt                  # class -> text
    python train.py <pre-training flags> --init-from out/in1k512_init.pt <the flags transfer.py prints>

Resolution r -> r': the model is rebuilt at r' with PE grid `resample` (positions linspace(0, n_base, n): every
resolution spans the pre-training range, App. C Pseudocode 1) or `extrapolate` (arange(n)); the schedule scale
becomes s * r'/r (Eq. 3, used for training and sampling) and the guidance default follows Eq. 4 with the factor
r'/r_pretrain (lam = 1 + 2 (1.5 - 1) = 2.0 at 512 from 1.5 at 256). Positional embeddings are computed, not
stored, so every weight is kept. Dataset: 1k -> 22k extends the class table (old ids keep their rows, or move by
--class-map, the null row moves to the end, new rows are fresh); class -> text keeps every backbone tensor and
replaces the semantic embedder (label table dropped, text/pooled projections fresh).
"""
import argparse
import copy
import json
import os

import torch

import conditioning
import models

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
    flags = {"--resolution": resolution}
    if "input_size" in m:  # transformers: patch grid of the source run, positions computed at r'
        b["model"]["input_size"] = round(m["input_size"] * factor)
        b["model"]["pe_grid"] = pe_grid
        b["model"]["pe_base"] = m.get("pe_base") or m["input_size"] // m.get("patch_size", 2)
        if pe_grid != m.get("pe_grid"):
            flags["--pe-grid"] = pe_grid
        flags["--pe-base"] = b["model"]["pe_base"]
    flags["--schedule-scale"] = b["schedule"]["scale"]
    new, report = carry_over(models.build_model(**b["model"]), sd)
    report["guidance_lam"] = conditioning.default_lam(b)  # Eq. 4: what evaluate.py will use at r'
    return b, new, report, flags


def transfer_classes(spec, sd, num_classes, class_map=None):
    """ImageNet-1k -> 22k (§3.4): extend the class table. Old class i goes to row class_map[i] (identity by
    default), the null row to the new last row; rows no old class lands on keep their fresh init."""
    assert spec["semantic"]["kind"] == "class", "--num-classes needs a class-conditional checkpoint"
    b = copy.deepcopy(spec)
    b["semantic"].update(num_classes=num_classes, null_id=num_classes)
    b["model"]["num_classes"] = num_classes
    new, report = carry_over(models.build_model(**b["model"]), sd, reinit=(TABLE,))
    old, table = sd[TABLE], new[TABLE].clone()  # (n_old + 1, D), (n_new + 1, D)
    n_old = old.shape[0] - 1
    class_map = list(range(n_old)) if class_map is None else list(class_map)
    assert len(class_map) == n_old and max(class_map) < num_classes, "class map: one new id < num_classes per old class"
    table[class_map] = old[:n_old]
    table[num_classes] = old[n_old]  # null row
    new[TABLE] = table
    report["reinitialised"].remove(TABLE)
    report["kept"].append(f"{TABLE}[{n_old} class rows + null row]")
    report["reinitialised"].append(f"{TABLE}[{num_classes - n_old} new class rows]")
    return b, new, report, {"--num-classes": num_classes}


def transfer_to_text(spec, sd, text_encoder="ViT-L-14", text_encoder_path="openai", text_pad="noisy", beta_txt=0.02):
    """ImageNet-1k -> CC12M (§3.4): keep the backbone, replace the semantic embedder (class table -> text)."""
    assert spec["semantic"]["kind"] == "class", "--to-text needs a class-conditional checkpoint"
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


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # io
    p.add_argument("--ckpt", required=True, help="source checkpoint (train.py format; EMA weights are used)")
    p.add_argument("--out", required=True, help="where to write the transferred checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh init of re-initialised tensors (default: 0)")
    # resolution transfer
    p.add_argument("--resolution", type=int, default=None, help="new resolution r' in pixels (default: keep)")
    p.add_argument("--pe-grid", choices=["resample", "extrapolate"], default="resample",
                   help="PE grid at r': resample spans the pre-training range (paper), extrapolate = arange "
                   "(default: resample)")
    # dataset transfer
    p.add_argument("--num-classes", type=int, default=None, help="extend the class table to this many classes "
                   "(ImageNet-22k: 21841)")
    p.add_argument("--class-map", default=None, help="JSON list: new class id of each old class (default: identity)")
    p.add_argument("--to-text", action="store_true", help="class -> text: replace the semantic embedder")
    p.add_argument("--text-encoder", default="ViT-L-14", help="open_clip text tower or 'tiny' (default: ViT-L-14)")
    p.add_argument("--text-encoder-path", default="openai", help="its weights: tag or file (default: openai)")
    p.add_argument("--text-pad", default="noisy", help="text padding of the fine-tuning run (default: noisy, §2.1)")
    p.add_argument("--beta-txt", type=float, default=0.02, help="noisy padding beta (default: 0.02, Tab. 3)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    ck = models.read_checkpoint(args.ckpt)
    if "spec" not in ck:
        raise SystemExit(f"{args.ckpt}: no run spec in this checkpoint (written by an older train.py)")
    spec, sd = ck["spec"], ck.get("ema", ck.get("model"))  # EMA weights: what train.py --init-from prefers
    reports, flags = {}, {}
    if args.num_classes is not None:
        cmap = json.load(open(args.class_map)) if args.class_map else None
        spec, sd, reports["classes"], f = transfer_classes(spec, sd, args.num_classes, cmap)
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
                        "guidance_lam": conditioning.default_lam(spec)}}
    models.save_checkpoint(out, args.out)
    cmd = " ".join(f"{k} {_fmt(v)}" for k, v in flags.items())
    print(f"wrote {args.out}\nfine-tune: python train.py <pre-training flags> --init-from {args.out} {cmd} "
          f"--out-dir NEW_DIR")


if __name__ == "__main__":
    main()
