"""
The paper's findings in miniature: one subcommand per table, each a set of runs of the repo's own CLIs.

    python reproduce.py control     # Tab. 2a / Fig. 2: gamma_c uniform vs cosine (alpha 8): LPIPS-size, FID, judge
    python reproduce.py guidance    # Eq. 2: control guidance beta 1, 1.375, 2 at fixed lam: FID, judge
    python reproduce.py padding     # Tab. 3: --text-pad zero | replicate | noisy (tiny text tower): FID, captions
    python reproduce.py flip        # §3.3 / Fig. 6: flip augmentation with vs without flip in phi: left/right
    python reproduce.py transfer    # Fig. 8 / Tab. A3: pre-train at R, transfer to 2R, fine-tune; lam sweep (Eq. 4)
    python reproduce.py all         # the five in order, then their tables rewritten in RESULTS.md
    python reproduce.py captions    # levers of the text runs (flips, crops): do shape and side follow the caption?
    python reproduce.py control --seeds 0 1 2 3 --steps 3000 --out-dir runs/repro   # more seeds, longer runs
    python reproduce.py transfer --dry-run                                          # the commands and a time estimate

Every run is `python train.py` with its defaults plus the one flag its row varies (and the study's common flags,
e.g. `--semantic text --text-encoder tiny` for padding), then `python evaluate.py --ckpt ... --out <json>`; the
table is built from those JSON files. Seeds are fixed (`--seed` of train.py per `--seeds` entry; evaluation seeds
0..N-1 for every run, so rows share their initial noise). Outputs: <out-dir>/<study>/<run>_s<seed>/ (the run),
<study>.md (the table, with the paper's number in the last column), <study>.json (every number), commands.sh (every
command, in order) and <study>_*.png where the study has a figure. A rerun skips runs and evaluations whose outputs
exist (a finished run leaves done.json; an evaluation its JSON, named by its sample count).

Statistics: every row is trained with each `--seeds` entry (default 0 1 2) and reported as mean ± sd over seeds. Each
study states the paper's claims as (metric, baseline row, treatment row, the paper's sign of treatment − baseline);
the claim's verdict follows VERDICT_RULE on the paired per-seed differences, and the metric that decides it is
measured on `--num-samples` (default 500) images. FID decides nothing (it is off by default: at N = 500 its Inception
network alone would take most of a study's budget); `--fid` adds it as a column.

`all` runs the studies one after another with the same flags and rewrites each one's block in `--results` (default
RESULTS.md beside this file): the text between `<!-- reproduce:<study> -->` and `<!-- /reproduce:<study> -->`,
appended at the end when the markers are absent; everything outside the markers is kept.

How the scripts are called: this file imports only library files (data.py). Each command runs as a subprocess
(`python train.py ...`, a fresh interpreter, exactly what a user types); `--in-process` instead calls the script's
`main(argv)` with the same argv, as test_core.py does, for the smoke test. Either way the interface is the CLI, and
the fine-tune flags of `transfer` are read from what transfer.py prints.

Default sizes (`--steps` per study, 3 seeds, N = 500) aim at <= 30 min on a 2-core Zen 4 (5.7 steps/s of the
default job in bench.py; the slow Zen 1 at 2.5 steps/s takes up to 2.3x as long); `--dry-run` prints the estimate
at `--steps-per-s` (default 2.5 = bench.py's REF_STEPS_PER_S for the default job; pass what
`python bench.py --suite cpu-default` prints on your machine) and at the Zen 4's rate, from a time model fitted to
runs timed there (see CAL_STEPS_PER_S).
"""
import argparse
import contextlib
import datetime
import importlib
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import data

REPO = os.path.dirname(os.path.abspath(__file__))
STUDIES = ("control", "guidance", "padding", "flip", "transfer")
# each study's defaults (steps per training run; transfer: fine-tune steps), sized by estimate() for <= 30 min at
# CAL_STEPS_PER_S with 3 seeds and N = 500 (see --dry-run; at the slow machine's REF_STEPS_PER_S a study takes up to
# 2.3x that); explicit flags win
STUDY_DEFAULTS = {"control": dict(steps=700), "guidance": dict(steps=1800), "padding": dict(steps=600),
                  "flip": dict(steps=1100), "transfer": dict(steps=200, ref_max=400), "captions": dict(steps=500)}
# captions (not a paper table: what makes a tiny text run follow its caption): (row, train.py flags, steps at the
# default --steps, what the row changes against the text studies' runs)
LEVERS = [("baseline", [], 500, "the padding / flip runs: random global crops, random flips (flip in φ)"),
          ("no-flip", ["--no-flip"], 500, "no flips: a crop shows the side its caption says unless the crop moves it"),
          ("center", ["--crop", "center", "--no-flip"], 500, "centre crops, no flips: the crop's side is the "
           "caption's")]
TEXT = ["--semantic", "text", "--text-encoder", "tiny"]  # text mode on the embedded captions, no download
# the text studies train on centre crops (the captions study: random global crops move the object across the crop,
# so its side stops following the caption): padding without flips, flip with them (the flip is then the only thing
# that contradicts a caption's side, and φ says when)
CENTER = ["--crop", "center"]
# sampling steps of every evaluation (DDIM; Euler for rf, the tiny default): 25 so that three seeds at N = 500 fit
# the budget (deviation: Fig. 8 uses 50, the paper's FID protocol 250)
EVAL_STEPS = 25
SEEDS, NUM_SAMPLES, AUX_SAMPLES = [0, 1, 2], 500, 100  # repeats; images of a deciding / of any other evaluation
LOW_RES = data.RESOLUTION // 2  # transfer: pre-train at half the default job's resolution, fine-tune at it
# time model of --dry-run, fitted to runs timed alone on a 2-core AMD EPYC Zen 4 where bench.py's default job makes
# CAL_STEPS_PER_S (mmDiT-tiny, 24 px, batch 32, fp32); every term scales with CAL_STEPS_PER_S / --steps-per-s. A
# training step costs (resolution / 24)^TOKEN_EXP of the bench step (300 steps at 16 px: 36.5 s with START_S of
# start-up and saving); a guided sampling step of one image costs SAMPLE_COST training images (500 images x 25 steps:
# 31 s); a text run (77 tokens of the tiny tower besides the image's) costs TEXT_COST times a class run, in training
# (175 vs 330 img/s) and sampling (55 vs 24 s); the judge trains once per study (JUDGE_S); TF-Inception on 2 CPU
# cores: 0.32 s per image (RESULTS.md: 5000 reference images in ~27 min), not scaled
CAL_STEPS_PER_S, TOKEN_EXP, SAMPLE_COST, TEXT_COST, START_S, JUDGE_S = 5.72, 1.5, 0.63, 2.0, 7.0, 51.0
REF_STEPS_PER_S, REF_RES, REF_BATCH, INCEPTION_S, BUDGET_S = 2.5, 24, 32, 0.32, 1800
REF_MACHINE = "the Zen 1 (2-core AMD EPYC, AVX2)"  # RESULTS.md's slow machine, where REF_STEPS_PER_S was measured
CAL_MACHINE = "the Zen 4 (2-core AMD EPYC, AVX-512)"  # where the time model was fitted and the budget applies

# one rule turns the per-seed numbers of a claim into its verdict; RESULTS.md quotes this text
VERDICT_RULE = ("Δ = treatment − baseline, paired by training seed; over the n seeds where both rows have the "
                "metric, mean Δ and sd(Δ) (ddof = 1). 'reproduced': mean Δ has the paper's sign and "
                "|mean Δ| > 2·sd(Δ); 'contradicted': the opposite sign with the same margin; otherwise "
                "'within noise' (also when n < 2: one seed gives no spread to compare with)")
VERDICTS = ("reproduced", "contradicted", "within noise")
VERDICT_MARGIN = 2.0  # |mean Δ| must exceed this many sd(Δ)

# the paper's claims each study tests: (claim, metric key, baseline row, treatment row, the paper's sign of
# treatment − baseline in that metric); transfer's key is filled with the last fine-tune step
CLAIMS = {
    "control": [("cosine γ_c makes the image ignore the size condition (Tab. 2a: LPIPS 0.33 → 0.04)", "lpips",
                 "uniform", "cosine", -1)],
    "guidance": [("β = 1.375 beats plain CFG (Tab. A3: FID 1.71 → 1.59)", "judge_acc", 1.0, 1.375, +1),
                 ("β = 2 is past the optimum (Fig. 7 right)", "judge_acc", 1.375, 2.0, -1)],
    "padding": [("noisy padding beats zero padding (Tab. 3: CLIP 26.25 → 26.60)", "caption_mean", "zero", "noisy",
                 +1),
                ("replicate padding beats zero padding (Tab. 3: CLIP 26.25 → 26.47)", "caption_mean", "zero",
                 "replicate", +1),
                ("noise on the replicates helps (Tab. 3: CLIP 26.47 → 26.60)", "caption_mean", "replicate", "noisy",
                 +1)],
    "flip": [("flip in φ lets the model follow left/right (Fig. 6)", "caption_side", "no-flip", "flip", +1)],
    "captions": [("training without flips makes side follow the caption", "caption_side", "baseline", "no-flip", +1),
                 ("centre crops without flips make side follow the caption", "caption_side", "baseline", "center",
                  +1)],
    "transfer": [("extrapolated PE is worse than resampled (Fig. 8a)", "judge_acc@{final}", "baseline", "extrapolate",
                  -1),
                 ("no Eq. 3 rescale is worse (Fig. 8b)", "judge_acc@{final}", "baseline", "no-rescale", -1),
                 ("local-view pre-training is better (Tab. A3 right, Fig. 8c)", "judge_acc@{final}", "baseline",
                  "local", +1)],
}
METRIC_NAMES = {"lpips": "LPIPS-size (lower: ignores size)", "judge_acc": "judge accuracy",
                "caption_mean": "caption agreement (mean)", "caption_side": "caption agreement (side)",
                "judge_acc@{final}": "judge accuracy after fine-tuning"}

# the paper's numbers beside each row (Tab. 2a, A6, 3, A3 and Fig. 8 of Berrada et al. 2024)
PAPER = {
    "control": {"uniform": "FID 3.08, LPIPS 0.33, /HR 0.210", "cosine": "FID 3.04, LPIPS 0.04, /HR 0.009",
                "linear": "FID 3.13, LPIPS 0.07, /HR 0.041", "step": "FID 3.15, LPIPS 0.09, /HR 0.046 (σ ≤ 1)"},
    "guidance": {1.0: "FID 1.71 (Tab. A3, IN1k, β = 1)", 1.375: "FID 1.59 (Tab. A3; best β, Fig. 7 right)",
                 2.0: "worse than 1.375 (Fig. 7 right)"},
    "padding": {"zero": "FID 7.19, CLIP 26.25", "replicate": "FID 6.93, CLIP 26.47",
                "noisy": "FID 6.79, CLIP 26.60 (β_txt 0.02)"},
    "flip": {"flip": "FID 8.40, CLIP 23.68 (Tab. 2c); follows left/right (Fig. 6)",
             "no-flip": "FID 8.43, CLIP 23.59 (Tab. 2c); confuses left/right (Fig. 6)"},
    "transfer": {"baseline": "FID 6.27 with every change (Tab. A3 right)",
                 "extrapolate": "≈ +0.2 FID after 130k it. (Fig. 8a)",
                 "no-rescale": "≈ +0.7 FID after 40k it. (Fig. 8b)",
                 "local": "FID 7.25 → 6.89 with local-view pre-training (Tab. A3 right, Fig. 8c)"},
}


# ----------------------------------------------------------------------------- running the CLIs
class Runner:
    """Runs `python <script>.py argv` (subprocess, or main(argv) in this process), logging every command."""

    def __init__(self, args, out):
        self.args, self.out, self.plan, self.ran = args, out, [], 0
        os.makedirs(out, exist_ok=True)

    def __call__(self, script, argv, capture=False):
        argv = [str(a) for a in argv]
        line = shlex.join(["python", f"{script}.py", *argv])
        self.plan.append((script, argv))
        if self.args.dry_run:
            print(line)
            return ""
        with open(os.path.join(self.out, "commands.sh"), "a") as f:
            f.write(line + "\n")
        self.ran += 1
        print(f"\n$ {line}", flush=True)
        if self.args.in_process:
            main = importlib.import_module(script).main
            if not capture:
                main(argv)
                return ""
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                main(argv)
            return buf.getvalue()
        r = subprocess.run([sys.executable, f"{script}.py", *argv], cwd=REPO, check=True, text=True,
                           stdout=subprocess.PIPE if capture else None)
        return r.stdout or ""


class Study:
    """The runs of one study: train (skipped when done.json says so), evaluate (skipped when its JSON exists)."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.join(args.out_dir, args.study)
        self.run = Runner(args, self.out)
        self.extra_train = shlex.split(args.train_args)
        self.extra_eval = shlex.split(args.eval_args)
        self.planned = set()  # (run dir, steps) already trained in this invocation

    def train(self, name, seed, flags, steps=None, init=None):
        """One train.py run: <defaults> + flags, --seed, --max-steps; returns its directory."""
        steps = steps or self.args.steps
        d = os.path.join(self.out, f"{name}_s{seed}")
        argv = [*self.extra_train, *flags, "--seed", seed, "--max-steps", steps, "--out-dir", d, "--device",
                self.args.device, *(["--init-from", init] if init else [])]  # the row's own flags win
        done = os.path.join(d, "done.json")
        if (d, steps) in self.planned or os.path.isfile(done) and json.load(open(done)).get("steps") == steps:
            return d
        self.planned.add((d, steps))
        self.run("train", argv)
        if not self.args.dry_run:
            with data.atomic_write(done, "w") as f:
                json.dump({"steps": steps, "argv": [str(a) for a in argv]}, f)
        return d

    def evaluate(self, ckpt, tag, flags=(), fid=True, deciding=True):
        """evaluate.py on a checkpoint -> its metrics dict (None in a dry run); N = --num-samples where the result
        decides a verdict, else --aux-samples (at most --num-samples)."""
        a = self.args
        n = a.num_samples if deciding else min(a.aux_samples, a.num_samples)
        out = f"{os.path.splitext(ckpt)[0]}_{tag}_n{n}_eval.json"  # N in the name: a rerun at another N re-scores
        if os.path.isfile(out):
            return json.load(open(out))
        fid_flags = ["--ref", "heldout", "--ref-max", a.ref_max] if (fid and a.fid) else ["--no-fid", "--ref",
                                                                                           "heldout"]
        argv = ["--ckpt", ckpt, "--out", out, "--num-samples", n, "--steps", a.eval_steps,
                "--batch-size", a.eval_batch, "--device", a.device, *self.extra_eval, *fid_flags, *flags]
        for flag in ("judge_train", "cache_dir", "inception_path", "lpips_alex_path"):
            if getattr(a, flag) is not None:
                argv += ["--" + flag.replace("_", "-"), getattr(a, flag)]
        self.run("evaluate", argv)
        return None if a.dry_run else json.load(open(out))

    def seeds(self, fn):
        """fn(seed) -> metrics dict, for every --seeds entry: {key: [values over seeds]}."""
        per = [fn(s) for s in self.args.seeds]
        if any(p is None for p in per):
            return {}
        return {k: [p.get(k) for p in per] for k in set().union(*per)}


# ----------------------------------------------------------------------------- tables
def fmt(vals, digits=3):
    """Mean over seeds, '± sd' with two or more seeds; '—' when missing."""
    vals = [v for v in (vals or []) if isinstance(v, (int, float)) and v == v]
    if not vals:
        return "—"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def mean(vals):
    vals = [v for v in (vals or []) if isinstance(v, (int, float)) and v == v]
    return sum(vals) / len(vals) if vals else float("nan")


def finite(v):
    return isinstance(v, (int, float)) and v == v and abs(v) != float("inf")


def verdict(deltas, expected_sign):
    """VERDICT_RULE on the paired per-seed differences treatment − baseline; expected_sign: the paper's, +1 / -1."""
    d = [float(v) for v in deltas if finite(v)]
    if len(d) < 2:
        return "within noise"
    m = sum(d) / len(d)
    sd = math.sqrt(sum((v - m) ** 2 for v in d) / (len(d) - 1))
    if abs(m) <= VERDICT_MARGIN * sd:  # strict: at exactly the margin (and at Δ = 0 everywhere) it is noise
        return "within noise"
    return "reproduced" if (m > 0) == (expected_sign > 0) else "contradicted"


def claims(study, res, final=None):
    """Each claim of the study as {claim, metric, deltas, verdict, ...}, pairing seeds by position in --seeds."""
    out = []
    for text, key, base, treat, sign in CLAIMS[study.args.study]:
        metric = key.format(final=final)
        b, t = (res.get(base) or {}).get(metric), (res.get(treat) or {}).get(metric)
        if base not in res or treat not in res:  # a row left out by --schedules / --betas
            continue
        deltas = [tv - bv if finite(bv) and finite(tv) else None for bv, tv in zip(b or [], t or [])]
        out.append(dict(claim=text, metric=metric, name=METRIC_NAMES[key], baseline=f"{base:g}" if isinstance(
                        base, float) else base, treatment=f"{treat:g}" if isinstance(treat, float) else treat,
                        sign=sign, deltas=deltas, verdict=verdict(deltas, sign) if deltas else "within noise"))
    return out


def claims_md(cl):
    """The verdict table: one line per claim."""
    if not cl:
        return ""
    lines = ["", "| claim | decided by | treatment − baseline | Δ per seed | mean Δ ± sd | paper's sign | "
             "verdict |", "|---|---|---|---|---|---|---|"]
    for c in cl:
        per = ", ".join("—" if v is None else f"{v:+.3f}" for v in c["deltas"]) or "—"
        lines.append(f"| {c['claim']} | {c['name']} | {c['treatment']} − {c['baseline']} | {per} | "
                     f"{fmt(c['deltas'])} | {'+' if c['sign'] > 0 else '−'} | **{c['verdict']}** |")
    return "\n".join(lines)


def write_table(study, title, header, rows, notes=(), extra="", final=None):
    """<out>/<study>.md: a title, the markdown table (no FID columns under --no-fid), the claims with their verdicts,
    notes; returns its text."""
    keep = [i for i, h in enumerate(header) if study.args.fid or not h.startswith("FID")]
    header, rows = [header[i] for i in keep], [[r[i] for i in keep] for r in rows]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    study.claims = claims(study, study.results, final)
    lines += [claims_md(study.claims)] if study.claims else []
    notes = [*notes, f"verdict rule: {VERDICT_RULE}"] if study.claims else notes
    lines += [""] + [f"- {n}" for n in notes] + ([extra] if extra else [])
    text = "\n".join(lines) + "\n"
    if not study.args.dry_run:
        with data.atomic_write(os.path.join(study.out, f"{study.args.study}.md"), "w") as f:
            f.write(text)
    return text


def setting(a):
    return (f"{a.steps} steps per run, seeds {' '.join(map(str, a.seeds))} (mean ± sd over seeds), {a.num_samples} "
            f"samples per evaluation, {a.eval_steps} sampling steps; FID " +
            (f"vs {a.ref_max} held-out embedded images (N = {a.num_samples}; decides nothing)" if a.fid else
             "off (--fid adds it; it decides nothing)"))


# ----------------------------------------------------------------------------- the studies
def control(study):
    """Tab. 2a / A6: γ_c(t) of Eq. 1; the recipe's cosine α = 8 is the baseline, each other row is --gamma X."""
    a, rows, res = study.args, [], {}
    study.results = res
    tag = "control" if a.lpips_net == "alex" else f"control_{a.lpips_net}"  # its own JSON per distance
    for sched in a.schedules:
        flags = [] if sched == "cosine" else ["--gamma", sched]
        m = study.seeds(lambda s: study.evaluate(study.train(sched, s, flags) + "/ckpt.pt", tag,
                                                 ["--lpips-prompts", a.lpips_prompts, "--lpips-net", a.lpips_net]))
        res[sched] = m
        rows.append([sched, " ".join(flags) or "(default: cosine, α = 8)", fmt(m.get("lpips")),
                     fmt(m.get("lpips_hr")), fmt(m.get("fid"), 1), fmt(m.get("judge_acc")),
                     fmt(m.get("judge_ceiling")), PAPER["control"].get(sched, "—")])
    dist = "LPIPS" if a.lpips_net == "alex" else "pixel distance"
    write_table(study, "Control conditioning: γ_c(t) (Tab. 2a, Tab. A6, Fig. 2)",
                ["γ_c", "flag", dist, f"{dist}/HR", "FID", "judge", "judge ceiling", "paper (IN1k-256)"], rows,
                [setting(a), dist + ("" if a.lpips_net == "alex" else " (evaluate.py --lpips-net pixel: mean |a − b| "
                                     "/ 2 in [0, 1], the offline stand-in for LPIPS, not on its scale)") +
                 f": {a.lpips_prompts} prompts, sizes resolution × (¼, ½, 1, 2, 4), same seed and class per prompt "
                 "(evaluate.py --lpips-prompts); /HR: sizes ≥ the resolution",
                 f"the verdict is decided by the {dist} across sizes: {a.lpips_prompts} prompts × 5 sizes = "
                 f"{5 * a.lpips_prompts} images per run (the judge and FID decide nothing)",
                 "judge: class accuracy of the samples under the CNN trained on the run's real crops; ceiling: its "
                 "accuracy on held-out real crops; chance 0.1"])
    return res


def guidance(study):
    """Eq. 2: one training run (the defaults), evaluated at each β with λ fixed."""
    a, rows, res = study.args, [], {}
    study.results = res
    lam = ["--lam", a.lam] if a.lam is not None else []
    for beta in a.betas:
        m = study.seeds(lambda s: study.evaluate(study.train("default", s, []) + "/ckpt.pt", f"beta{beta:g}",
                                                 ["--beta", beta, *lam]))
        res[beta] = m
        rows.append([f"{beta:g}", f"--beta {beta:g}", fmt(m.get("fid"), 1), fmt(m.get("judge_acc")),
                     fmt(m.get("judge_ceiling")), PAPER["guidance"].get(beta, "—")])
    lam_txt = f"{a.lam:g}" if a.lam is not None else "evaluate.py's default (Eq. 4: 1.5 at the training resolution)"
    write_table(study, "Control guidance β of Eq. 2", ["β", "evaluate.py flag", "FID", "judge", "judge ceiling",
                                                       "paper"], rows,
                [setting(a), f"one training run per seed, evaluated at every β with λ = {lam_txt}",
                 "β = 1 is plain classifier-free guidance (the control-dropped branch gets weight 0)",
                 f"the verdicts are decided by judge accuracy at N = {a.num_samples} (deviation: the paper's metric is "
                 "FID, which at N = 500 is both noisier and over the budget with 3 seeds × 3 β)"])
    return res


def caption_cols(m):
    return [fmt(m.get("caption_shape")), fmt(m.get("caption_side")), fmt(m.get("caption_colour")),
            fmt(m.get("caption_mean"))]


CAPTION_NOTE = ("caption agreement (evaluate.py --caption-agreement): shape = the judge's class, side = the side of "
                "the foreground's centre of mass, colour = the nearest palette colour of the foreground; chance 0.1 / "
                "0.5 / 0.125; generated with --size-cond center (the centre-crop view of a training-size original, "
                "on which real images agree ≥ 0.99)")


def padding(study):
    """Tab. 3: text padding after EOT, text-conditional on the embedded captions with the tiny tower."""
    a, rows, res = study.args, [], {}
    study.results = res
    for pad in ("zero", "replicate", "noisy"):
        flags = TEXT + CENTER + ["--no-flip", "--text-pad", pad]
        m = study.seeds(lambda s: study.evaluate(study.train(pad, s, flags) + "/ckpt.pt", "padding",
                                                 ["--size-cond", "center", "--no-clip", "--caption-agreement"]))
        res[pad] = m
        rows.append([pad, f"--text-pad {pad}", fmt(m.get("fid"), 1), *caption_cols(m), PAPER["padding"][pad]])
    write_table(study, "Text padding (Tab. 3)", ["padding", "flag", "FID", "shape", "side", "colour", "mean",
                                                  "paper (CC12M-256)"], rows,
                [setting(a), f"every run: {' '.join(TEXT + CENTER)} --no-flip (a seeded random 2-layer text tower; "
                 "the paper uses CLIP ViT-L/14, and reports CLIPScore where we report caption agreement; centre crops "
                 "without flips: the setting in which the captions study's runs follow side)", CAPTION_NOTE,
                 "noisy = the recipe's default (β_txt 0.02); replicate = no noise",
                 f"the verdicts are decided by the mean caption agreement at N = {a.num_samples} (the stand-in for "
                 "the paper's CLIPScore)"])
    return res


def flip(study):
    """§3.3 / Fig. 6: centre crops with flip augmentation in both runs; the second drops flip from φ (--control crop
    size). Centre crops keep the object on its caption's side, so a flip is the only thing that contradicts it."""
    a, rows, res = study.args, [], {}
    study.results = res
    for name, flags in (("flip", []), ("no-flip", ["--control", "crop", "size"])):
        m = study.seeds(lambda s: study.evaluate(study.train(name, s, TEXT + CENTER + flags) + "/ckpt.pt",
                                                 "leftright",
                                                 ["--prompts", "leftright", "--size-cond", "center", "--no-clip",
                                                  "--caption-agreement"], fid=False))
        res[name] = m
        rows.append([name, " ".join(flags) or "(default: --control crop size flip)", *caption_cols(m),
                     PAPER["flip"][name]])
    write_table(study, "Flip conditioning (§3.3, Fig. 6, Tab. 2c)", ["φ", "flag", "shape", "side (left/right)",
                                                                     "colour", "mean", "paper"], rows,
                [setting(a).split("; FID")[0] + "; FID off", f"every run: {' '.join(TEXT + CENTER)}, random flips "
                 "p = 0.5 (the default); captions describe the unflipped original, and a centre crop keeps the "
                 "object on its caption's side, so the flip is the only thing that contradicts the caption",
                 "prompts: the balanced 'a <colour> <shape> on the <left/right>' set (evaluate.py --prompts "
                 "leftright), sampled with flip = 0 in φ", CAPTION_NOTE,
                 f"the verdict is decided by the side agreement at N = {a.num_samples}"])
    return res


def captions(study):
    """Which levers make a text run follow its caption (side above all, which flip needs): the padding/flip runs'
    setting (the tiny tower, random global crops, random flips) against one change each, on the balanced left/right
    prompts. Not one of the paper's tables: it decides what the text studies can show at CPU scale."""
    a, rows, res = study.args, [], {}
    study.results = res
    for name, flags, steps, what in LEVERS:
        m = study.seeds(lambda s: study.evaluate(
            study.train(name, s, TEXT + flags, steps=steps * a.steps // STUDY_DEFAULTS["captions"]["steps"])
            + "/ckpt.pt", "leftright", ["--prompts", "leftright", "--size-cond", "center", "--no-clip",
                                        "--caption-agreement"], fid=False))
        res[name] = m
        rows.append([name, " ".join(flags) or "(the text studies' runs)", what, *caption_cols(m)])
    write_table(study, "Text runs that follow their captions: levers", ["lever", "flags", "what it changes",
                                                                        "shape", "side (left/right)", "colour",
                                                                        "mean"], rows,
                [setting(a).split("; FID")[0] + "; FID off", f"every run: {' '.join(TEXT)}; captions describe the "
                 "unflipped original", "prompts: the balanced 'a <colour> <shape> on the <left/right>' set "
                 "(evaluate.py --prompts leftright), sampled with flip = 0 and the centre-crop view in φ",
                 CAPTION_NOTE, "each lever's verdict: its side agreement against the baseline's, by the rule"])
    return res


def finetune_flags(printed, out):
    """The flags transfer.py prints after `--init-from <out>` on its 'fine-tune:' line."""
    line = next(ln for ln in printed.splitlines() if ln.startswith("fine-tune:"))
    flags = shlex.split(line.split(f"--init-from {out}", 1)[1])
    if "--out-dir" in flags:  # its placeholder NEW_DIR: each fine-tune gets its own
        i = flags.index("--out-dir")
        flags = flags[:i] + flags[i + 2:]
    return flags


def replace_flag(flags, name, value):
    i = flags.index(name)
    return flags[:i + 1] + [str(value)] + flags[i + 2:]


TRANSFER_VARIANTS = {  # name: (pre-training flags, transfer.py flags, fine-tune flag change)
    "baseline": ([], [], None), "extrapolate": ([], ["--pe-grid", "extrapolate"], None),
    "no-rescale": ([], [], ("--schedule-scale", 1.0)), "local": (["--crop", "local"], [], None)}
TRANSFER_WHAT = {"baseline": "(resample PE, Eq. 3 rescale, global crops)",
                 "extrapolate": "transfer.py --pe-grid extrapolate", "no-rescale": "fine-tune --schedule-scale 1",
                 "local": "pre-train --crop local"}


def transfer_seed(study, name, s, k_eval):
    """One seed of one variant: pre-train at --low-res, transfer.py to 2x, fine-tune, evaluating at each step of
    k_eval (0 = the transferred checkpoint); the baseline also sweeps λ at both resolutions (Eq. 4)."""
    a = study.args
    lo, hi = a.low_res, 2 * a.low_res
    pre_flags, tr_flags, change = TRANSFER_VARIANTS[name]
    pre = study.train(f"pre{lo}{'_local' if pre_flags else ''}", s, ["--resolution", lo, *pre_flags],
                      steps=a.pre_steps or a.steps)
    init = os.path.join(study.out, f"{name}_s{s}_init{hi}.pt")
    printed = study.run("transfer", ["--ckpt", pre + "/ckpt.pt", "--resolution", hi, "--out", init, *tr_flags],
                        capture=True) if not os.path.isfile(init) or a.dry_run else None
    ft_file = init + ".flags.json"  # what transfer.py printed, kept for reruns
    if printed is not None and not a.dry_run:
        with data.atomic_write(ft_file, "w") as f:
            json.dump(finetune_flags(printed, init), f)
    ft = json.load(open(ft_file)) if not a.dry_run else ["--resolution", hi, "--schedule-scale", "(printed)"]
    if change:
        ft = replace_flag(ft, *change)
    out = {}
    for k in k_eval:
        if k == 0:
            ck = init
        else:
            d = study.train(f"ft{hi}_{name}", s, ft, steps=k, init=init)
            ck = os.path.join(d, f"ckpt_{k:06d}.pt")
            if not a.dry_run and not os.path.isfile(ck):
                shutil.copyfile(os.path.join(d, "ckpt.pt"), ck)
        m = study.evaluate(ck, "transfer", deciding=k == k_eval[-1])  # the last step decides the verdicts
        for key in ("judge_acc", "fid"):
            out[f"{key}@{k}"] = None if m is None else m.get(key)
    if name == "baseline":  # λ sweep at both resolutions (Eq. 4)
        for lam in a.lams:
            for r, ck in ((lo, pre + "/ckpt.pt"), (hi, ck)):
                m = study.evaluate(ck, f"lam{lam:g}", ["--lam", lam], deciding=False)
                for key in ("judge_acc", "fid"):
                    out[f"lam{lam:g}_{key}@{r}"] = None if m is None else m.get(key)
    return out


def lam_sweep(a, base, lo, hi):
    """The baseline's λ sweep as markdown, and the best λ at each resolution: lowest mean FID (the paper's
    criterion), else the highest judge accuracy."""
    rows = [[f"{lam:g}", *[fmt(base.get(f"lam{lam:g}_{k}@{r}"), d) for r in (lo, hi)
                          for k, d in (("fid", 1), ("judge_acc", 3))]] for lam in a.lams]

    def best(r):
        key, sign = ("fid", 1) if a.fid else ("judge_acc", -1)
        vals = {lam: sign * mean(base.get(f"lam{lam:g}_{key}@{r}")) for lam in a.lams}
        vals = {k: v for k, v in vals.items() if v == v}
        return min(vals, key=vals.get) if vals else float("nan")

    b_lo, b_hi = best(lo), best(hi)
    md = "\n".join(["", f"### Guidance law (Eq. 4): λ sweep of the baseline at {lo} px (pre-trained) and {hi} px "
                    "(fine-tuned)", "", f"| λ | FID @{lo} | judge @{lo} | FID @{hi} | judge @{hi} |",
                    "|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows] +
                   ["", f"- best λ at {lo} px: {b_lo:g}; Eq. 4 predicts {1 + 2 * (b_lo - 1):g} at {hi} px; "
                    f"best λ measured at {hi} px: {b_hi:g} (by {'FID' if a.fid else 'judge accuracy'})",
                    "- paper: λ* = 1.5 at 256 and 2.0 at 512 (Fig. 7 left/centre, App. C)"])
    return md, b_lo, b_hi


def transfer(study):
    """Fig. 8 / Tab. A3 right: pre-train at --low-res, transfer.py to 2x, fine-tune, evaluating along the way."""
    a = study.args
    lo, hi = a.low_res, 2 * a.low_res
    k_eval = sorted({round(a.steps * j / a.ft_evals) for j in range(a.ft_evals + 1)})  # fine-tune steps, from 0
    curves, rows = {}, []
    study.results = curves
    for name in TRANSFER_VARIANTS:
        m = study.seeds(lambda s: transfer_seed(study, name, s, k_eval))
        curves[name] = m
        rows.append([name, TRANSFER_WHAT[name], *[fmt(m.get(f"judge_acc@{k}")) for k in k_eval],
                     *[fmt(m.get(f"fid@{k}"), 1) for k in k_eval], PAPER["transfer"][name]])
    lam_md, b_lo, b_hi = lam_sweep(a, curves["baseline"], lo, hi)
    write_table(study, f"Resolution transfer {lo} → {hi} px (Fig. 8, Tab. A3 right)",
                ["variant", "differs from the baseline by", *[f"judge @{k}" for k in k_eval],
                 *[f"FID @{k}" for k in k_eval], "paper (IN1k-512 / CC12M)"], rows,
                [setting(a) + f"; pre-training {a.pre_steps or a.steps} steps at {lo} px, fine-tuning evaluated "
                 f"after {', '.join(map(str, k_eval))} steps at {hi} px (0 = the transferred checkpoint itself)",
                 "fine-tune flags: what transfer.py prints (--resolution, --pe-base, --schedule-scale, "
                 "--base-resolution, --pe-grid); λ by Eq. 4 (2.0 after 2×)",
                 f"the verdicts are decided by judge accuracy after {k_eval[-1]} fine-tune steps at N = "
                 f"{a.num_samples}; the other evaluations (step {', '.join(map(str, k_eval[:-1])) or '—'}, the λ "
                 f"sweep) use N = {min(a.aux_samples, a.num_samples)} and decide nothing",
                 f"figures: {a.study}_judge.png, {a.study}_fid.png"], lam_md, final=k_eval[-1])
    if not a.dry_run:
        for key, label in (("judge_acc", "judge accuracy"), ("fid", "FID")):
            series = {n: (k_eval, [mean(c.get(f"{key}@{k}")) for k in k_eval]) for n, c in curves.items()}
            data.plot_lines(series, os.path.join(study.out, f"{a.study}_{key.split('_')[0]}.png"),
                            f"{label} vs fine-tune steps at {hi} px")
    return {"curves": curves, "best_lam": {lo: b_lo, hi: b_hi}}


# ----------------------------------------------------------------------------- time estimate (--dry-run)
def estimate(plan, a, rate=None):
    """Seconds of the planned commands at `rate` steps/s of the default job (default: --steps-per-s), by the time
    model above: training steps and guided sampling scaled by tokens and text, start-up per command, the FID network
    per image, the judge and the held-out reference once per resolution."""
    rate = rate or a.steps_per_s
    slow = CAL_STEPS_PER_S / rate
    total, res = 0.0, {}
    for script, argv in plan:
        opt = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
        total += START_S * slow
        if script == "train":
            r = int(opt.get("--resolution", data.RESOLUTION))
            text = TEXT_COST if opt.get("--semantic") == "text" else 1.0
            res[opt["--out-dir"]] = (r, text)
            prev = res.get(opt["--out-dir"] + ":steps", 0)  # fine-tune segments resume
            steps = int(opt["--max-steps"]) - prev
            res[opt["--out-dir"] + ":steps"] = int(opt["--max-steps"])
            total += steps / rate * (r / REF_RES) ** TOKEN_EXP * text
        elif script == "evaluate":
            ck = opt["--ckpt"]
            r, text = res.get(os.path.dirname(ck), (2 * a.low_res if "_init" in ck else data.RESOLUTION, 1.0))
            n, s = int(opt["--num-samples"]), int(opt["--steps"])
            lp = int(opt.get("--lpips-prompts", 0)) * 5
            total += (n + lp) * s * SAMPLE_COST / REF_BATCH / rate * (r / REF_RES) ** TOKEN_EXP * text
            total += INCEPTION_S * n if "--no-fid" not in argv else 0
    n_res = len({2 * a.low_res, a.low_res}) if a.study == "transfer" else 1  # held-out references, cached after
    total += JUDGE_S * slow * n_res + (INCEPTION_S * (a.ref_max + a.num_samples) * n_res if a.fid else 0)
    return total


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=[*STUDIES, "captions", "all"], help="which table to make; all: the five in "
                   "order, then their blocks in --results rewritten; captions: which levers make the tiny text runs "
                   "follow their captions (not in all)")
    # runs
    p.add_argument("--steps", type=int, default=None, help="training steps per run (transfer: fine-tune steps) "
                   f"(default: per study, {dict((k, v['steps']) for k, v in STUDY_DEFAULTS.items())})")
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="train.py --seed of each repeat; every row "
                   "is their mean ± sd and a verdict needs two or more (default: 0 1 2)")
    p.add_argument("--train-args", default="", help="flags added to every train.py run, e.g. '--resolution 16' "
                   "(default: none = train.py's defaults)")
    p.add_argument("--device", default="auto", help="train.py / evaluate.py --device (default: auto)")
    # evaluation
    p.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="images of every evaluation whose metric "
                   f"decides a verdict (default: {NUM_SAMPLES})")
    p.add_argument("--aux-samples", type=int, default=AUX_SAMPLES, help="images of the evaluations that decide "
                   f"nothing: transfer's earlier fine-tune steps and λ sweep (default: {AUX_SAMPLES}, at most "
                   "--num-samples)")
    p.add_argument("--eval-steps", type=int, default=EVAL_STEPS, help="sampling steps (DDIM; Euler for rf) "
                   f"(default: {EVAL_STEPS})")
    p.add_argument("--eval-batch", type=int, default=100, help="evaluate.py --batch-size (default: 100)")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=False, help="FID vs held-out embedded "
                   "images at the evaluation's N, as a column that decides nothing (default: off: 0.32 s per image "
                   "of the Inception network on 2 cores, over the budget at 3 seeds × N = 500)")
    p.add_argument("--ref-max", type=int, default=1000, help="held-out reference images for FID (default: 1000; "
                   "transfer 400)")
    p.add_argument("--judge-train", type=int, default=None, help="evaluate.py --judge-train (default: its own)")
    p.add_argument("--eval-args", default="", help="flags added to every evaluate.py call (default: none)")
    p.add_argument("--cache-dir", default=None, help="evaluate.py --cache-dir (default: its own)")
    p.add_argument("--inception-path", default=None, help="evaluate.py --inception-path (default: its own)")
    p.add_argument("--lpips-alex-path", default=None, help="evaluate.py --lpips-alex-path (default: its own)")
    # study knobs
    p.add_argument("--schedules", nargs="+", default=["uniform", "cosine"], choices=["uniform", "cosine", "linear",
                   "step"], help="control: γ_c schedules; add linear step for Tab. A6 (default: uniform cosine)")
    p.add_argument("--lpips-net", choices=["alex", "pixel"], default="alex", help="control: evaluate.py --lpips-net; "
                   "pixel needs no AlexNet weights (default: alex, the paper's LPIPS)")
    p.add_argument("--lpips-prompts", type=int, default=100, help="control: LPIPS prompts, 5 sizes each; their "
                   "distance decides the verdict (default: 100 = 500 images)")
    p.add_argument("--betas", type=float, nargs="+", default=[1.0, 1.375, 2.0], help="guidance: β values "
                   "(default: 1 1.375 2)")
    p.add_argument("--lam", type=float, default=None, help="guidance: fixed λ (default: evaluate.py's, 1.5)")
    p.add_argument("--low-res", type=int, default=LOW_RES, help="transfer: pre-training resolution; fine-tune at "
                   f"2× (default: {LOW_RES} -> {2 * LOW_RES}, the default job's)")
    p.add_argument("--pre-steps", type=int, default=None, help="transfer: pre-training steps (default: 2 × --steps)")
    p.add_argument("--ft-evals", type=int, default=1, help="transfer: evaluations along fine-tuning, besides step 0 "
                   "(default: 1)")
    p.add_argument("--lams", type=float, nargs="+", default=[1.5, 3.0], help="transfer: λ sweep (default: 1.5 3)")
    # system
    p.add_argument("--out-dir", default=os.path.join("runs", "repro"), help="root of every study (default: "
                   "runs/repro)")
    p.add_argument("--in-process", action="store_true", help="call each script's main(argv) here instead of a "
                   "subprocess (the tests)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and the time estimate, run nothing")
    p.add_argument("--steps-per-s", type=float, default=REF_STEPS_PER_S, help="default job's training steps/s for "
                   f"the estimate (default: {REF_STEPS_PER_S}, bench.py's reference machine)")
    p.add_argument("--results", default=None, help="markdown file whose per-study blocks get the new tables "
                   "(default: none for one study; RESULTS.md beside reproduce.py for all)")
    return p


def parse(argv, study=None):
    """argv -> args with the study's defaults (study overrides the positional: how `all` reuses one argv)."""
    p = get_parser()
    study = study or p.parse_args(argv).study
    p.set_defaults(**STUDY_DEFAULTS.get(study, {}))  # all: each study parses again with its own
    args = p.parse_args(argv)
    args.study = study
    if args.study == "transfer" and args.pre_steps is None:
        args.pre_steps = 2 * args.steps
    for flag in ("steps", "num_samples", "aux_samples", "eval_steps", "lpips_prompts", "ft_evals"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            sys.exit(f"reproduce.py: error: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if len(set(args.seeds)) != len(args.seeds):
        sys.exit(f"reproduce.py: error: --seeds {' '.join(map(str, args.seeds))} repeats a seed; each names one run")
    return args


def run_study(args):
    """One study: its runs, table and JSON; returns (table markdown, wall seconds, commands run), None in a dry run.
    The wall time is that of the last invocation that ran commands: a rerun that only reads results keeps it."""
    t0 = time.time()
    study = Study(args)
    study.results, study.claims = {}, []
    res = globals()[args.study](study)
    wall, ran = time.time() - t0, study.run.ran
    est = estimate(study.run.plan, args)
    on_cal = estimate(study.run.plan, args, CAL_STEPS_PER_S)
    print(f"\n{args.study}: {len(study.run.plan)} commands; estimated {est / 60:.0f} min at {args.steps_per_s:g} "
          f"steps/s of the default job; {on_cal / 60:.0f} min on {CAL_MACHINE} at {CAL_STEPS_PER_S:g}, where the "
          f"budget is {BUDGET_S // 60} min" + ("" if on_cal <= BUDGET_S else " (over the budget)"))
    if args.dry_run:
        return None
    path = os.path.join(study.out, f"{args.study}.json")
    if ran == 0 and os.path.isfile(path):
        prev = json.load(open(path))
        wall, ran = prev.get("wall_s", wall), prev.get("commands_run", ran)
    with data.atomic_write(path, "w") as f:
        json.dump({"args": vars(args), "results": res, "claims": study.claims, "wall_s": wall, "commands_run": ran},
                  f, indent=1, default=str)
    md = open(os.path.join(study.out, f"{args.study}.md")).read()
    print(md)
    return md, wall, ran


def full_estimate(args):
    """estimate() of every command the study plans from scratch (a dry run into an empty folder), in seconds: at
    --steps-per-s and at CAL_STEPS_PER_S."""
    dry = argparse.Namespace(**{**vars(args), "dry_run": True})
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        dry.out_dir = tmp
        study = Study(dry)
        study.results, study.claims = {}, []
        globals()[dry.study](study)
        return estimate(study.run.plan, dry), estimate(study.run.plan, dry, CAL_STEPS_PER_S)


def machine():
    """lscpu's model name (else platform's) with its family / model and AVX-512 or AVX2 (a bare "AMD EPYC" names
    several generations), and the core count."""
    name, detail = "", ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}
        name, flags = info.get("Model name", ""), info.get("Flags", "").split()
        simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
        detail = ", ".join(x for x in (f"family {info['CPU family']} model {info['Model']}" if "CPU family" in info
                                       and "Model" in info else "", simd) if x)
    name = name or platform.processor() or platform.machine()
    return f"{name} ({detail}), {os.cpu_count()} cores" if detail else f"{name}, {os.cpu_count()} cores"


def minsec(sec):
    m, s = divmod(int(sec + 0.5), 60)
    return f"{m} min {s} s"


def write_results(path, blocks):
    """Replace each study's block between its markers in path (append it where absent); keep everything else."""
    text = open(path).read() if os.path.isfile(path) else ""
    for name, body in blocks.items():
        begin, end = f"<!-- reproduce:{name} -->", f"<!-- /reproduce:{name} -->"
        block = f"{begin}\n{body.strip()}\n{end}"
        pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if pat.search(text):
            text = pat.sub(lambda _: block, text, count=1)
        else:
            text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    with data.atomic_write(path, "w") as f:
        f.write(text)


def result_block(args, argv, md, wall, ran):
    """A study's block: when, where, the command, wall time beside the --dry-run estimate, then its table one
    heading level down (RESULTS.md nests the studies under a section)."""
    cmd = shlex.join(["python", "reproduce.py", *[args.study if t == "all" else t for t in argv]])
    est, on_cal = full_estimate(args)
    where = REF_MACHINE if args.steps_per_s == REF_STEPS_PER_S else "the machine of --steps-per-s"
    head = (f"*{datetime.date.today().isoformat()}, {machine()}.* `{cmd}`: {minsec(wall)} wall ({ran} commands; the "
            f"rest, if any, reused from disk); `--dry-run` estimate: {est / 60:.0f} min for {where} at "
            f"{args.steps_per_s:g} steps/s, {on_cal / 60:.0f} min for {CAL_MACHINE} at {CAL_STEPS_PER_S:g} (budget "
            f"{BUDGET_S // 60} min there).")
    table = "\n".join("#" + ln if ln.startswith("#") else ln for ln in md.splitlines())
    return head + "\n\n" + table


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    todo = STUDIES if args.study == "all" else (args.study,)
    results = args.results or (os.path.join(REPO, "RESULTS.md") if args.study == "all" else None)
    blocks, t0 = {}, time.time()
    for name in todo:
        a = parse(argv, name)
        out = run_study(a)
        if out is not None and results:
            blocks[name] = result_block(a, argv, *out)
            write_results(results, blocks)  # after each study, so an interrupted `all` keeps what it finished
            print(f"{results}: rewrote the block of {name}")
    if args.study == "all":
        print(f"all: {minsec(time.time() - t0)} wall")


if __name__ == "__main__":
    main()
