r"""
Transfer a checkpoint to a new resolution or dataset (paper §2.2, §3.4). Writes a train.py-style
checkpoint (model = ema = transferred weights, step 0, the updated run spec) that `train.py --init-from` fine-tunes
from and sample.py / evaluate.py load directly; prints exactly which keys were kept / re-initialised / dropped.

    python transfer.py --ckpt out/in1k256/ckpt.pt --resolution 512 --out out/in1k512_init.pt        # r -> r'
    python transfer.py --make-class-map --old-classes /data/imagenet/train \
        --new-classes /data/imagenet22k/train --out out/in1k_to_in22k.json                           # the 1k -> 22k map
    python transfer.py --ckpt out/in1k256/ckpt.pt --num-classes 21841 --class-map out/in1k_to_in22k.json \
        --out out/in22k_init.pt                                                                      # 1k -> 22k
    python transfer.py --ckpt out/in1k256/ckpt.pt --to-text --out out/cc12m_init.pt                  # class -> text
    python train.py <pre-training flags> --init-from out/in1k512_init.pt <the flags transfer.py prints>
    python transfer.py --ckpt out/run/ckpt.pt --to-diffusers out/run_diffusers                      # -> diffusers

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

Export (--to-diffusers DIR): the inverse of weights.py's weight import, by the same key maps read backwards. The
model is rebuilt as the diffusers class that computes the same function (DiTTransformer2DModel,
PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel), its outputs are compared with ours once,
and the class's own save_pretrained writes DIR. Parts a class lacks (control conditioning, class labels in the
text-only classes, DiT's class token in attention, a PE grid diffusers cannot place, ...) stop it in one line that
names them. Outputs agree at the checkpoint's resolution; at other sizes diffusers rescales its PE grid its own way.

Library part (tests and users import it): the transfers above (carry_over, transfer_resolution, transfer_classes,
transfer_to_text, make_class_map). The weight formats of other projects (import from facebookresearch/DiT and
diffusers, and the diffusers export's key maps and checks) live in weights.py, which export_diffusers calls.
"""
import argparse
import collections
import copy
import json
import os
import shutil
import tempfile

import torch

import conditioning
import data
import models
import run
import weights

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


def transfer_resolution(spec, sd, resolution, pe_grid="resample", rescale=True):
    """Resolution r -> r' (§2.2): (new spec, weights, report, train.py flags). The schedule scale multiplies by
    r'/r (Eq. 3; rescale=False keeps it, the ablation of Fig. 8); transformers keep their positions spanning the
    pre-training grid [0, pe_base]."""
    b, m = copy.deepcopy(spec), spec["model"]
    factor = resolution / spec["data"]["resolution"]
    b["data"]["resolution"] = resolution
    b["schedule"]["scale"] = spec["schedule"]["scale"] * (factor if rescale else 1.0)
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


# ----------------------------------------------------------------------------- export (weights.py's diffusers format)
def load_run(path, ema=True):
    """(model in eval mode, checkpoint dict) through the one checkpoint loader (run.load_checkpoint); EMA
    weights unless ema=False."""
    return run.load_checkpoint(path, ema=ema)


def export_diffusers(args):
    """--to-diffusers DIR: check everything, compare outputs once, then write the folder (atomically: a sibling
    temporary folder renamed into place), so a refusal or a crash leaves DIR as it was."""
    out, flag = args.to_diffusers, "--to-diffusers"
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SystemExit(f"{flag} {out}: exists and is not an empty folder (nothing is overwritten)")
    model, ck = load_run(args.ckpt, ema=args.ema)
    spec = ck["spec"]
    ref = weights.to_diffusers(model, spec)
    x, t, cond = weights.check_inputs(model, spec)
    with torch.no_grad():
        want, got = model(x, t, cond), weights.diffusers_forward(ref, x, t, cond)
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    if err > weights.CHECK_TOL * max(1.0, scale):
        raise RuntimeError(f"{flag}: the exported model disagrees with ours (max |diff| {err:.3g}, outputs up to "
                           f"{scale:.3g})")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".to_diffusers.", dir=parent)
    try:
        ref.save_pretrained(tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cls, obj = type(ref).__name__, spec["schedule"]["objective"]
    print(f"wrote {out}: {cls}, {sum(p.numel() for p in ref.parameters()) / 1e6:.2f}M parameters, "
          f"{'EMA' if args.ema else 'raw (--no-ema)'} weights of {args.ckpt} (step {ck.get('step')})\n"
          f"check: ours vs diffusers on one random input: max |diff| {err:.3g} (outputs up to {scale:.3g})\n"
          f"its output is the run's objective {obj}: sample with a {weights.SCHEDULER_HINT[obj]}\n"
          f"load: diffusers.{cls}.from_pretrained({out!r})")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # io
    p.add_argument("--ckpt", default=None, help="source checkpoint (train.py format; EMA weights are used); "
                   "required unless --make-class-map")
    p.add_argument("--out", default=None, help="where to write the transferred checkpoint (the JSON map with "
                   "--make-class-map); required unless --to-diffusers")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh init of re-initialised tensors (default: 0)")
    # resolution transfer
    p.add_argument("--resolution", type=int, default=None, help="new resolution r' in pixels (default: keep)")
    p.add_argument("--pe-grid", choices=["resample", "extrapolate"], default="resample",
                   help="PE grid at r': resample spans the pre-training range (paper), extrapolate = arange "
                   "(default: resample)")
    # dataset transfer
    p.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=True, help="with --resolution: "
                   "multiply the schedule scale by r'/r (Eq. 3); --no-rescale keeps the pre-training schedule")
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
    # export
    p.add_argument("--to-diffusers", default=None, metavar="DIR", help="write the --ckpt model as a diffusers model "
                   "folder DIR (config.json + diffusion_pytorch_model.safetensors) that the matching class loads with "
                   "from_pretrained(DIR): dit -> DiTTransformer2DModel, pixart -> PixArtTransformer2DModel, mmdit -> "
                   "SD3Transformer2DModel, unet -> UNet2DConditionModel; stops in one line, writing nothing, if the "
                   "model has a part the class lacks (e.g. control conditioning); DIR must be new or empty")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="with --to-diffusers: export "
                   "the checkpoint's EMA weights, or with --no-ema its raw training weights (default: EMA)")
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


def check_export_args(args):
    """--to-diffusers exports a checkpoint as it is: it needs --ckpt and takes no transfer or --out flag."""
    if args.ckpt is None:
        raise SystemExit("transfer.py --to-diffusers: --ckpt PATH is required (the checkpoint to export)")
    given = [f for f, v in (("--out", args.out), ("--resolution", args.resolution), ("--num-classes", args.num_classes),
                            ("--class-map", args.class_map), ("--to-text", args.to_text),
                            ("--make-class-map", args.make_class_map)) if v]
    if given:
        raise SystemExit(f"transfer.py --to-diffusers exports the checkpoint as it is: drop {' '.join(given)} "
                         "(transfer first with --out, then export that checkpoint)")


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.to_diffusers is not None:
        check_export_args(args)
        return export_diffusers(args)
    if not args.ema:
        raise SystemExit("transfer.py: --no-ema only goes with --to-diffusers (a transfer starts from the EMA weights)")
    if args.out is None:
        p.error("the following arguments are required: --out")
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
        spec, sd, reports["resolution"], f = transfer_resolution(spec, sd, args.resolution, args.pe_grid,
                                                                           args.rescale)
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
