"""
The harness of reproduce.py's studies: how a study runs the repo's CLIs and what it costs.

- Runner runs `python <script>.py argv` (a subprocess, exactly what a user types, or the script's main(argv) in
  this process for the tests) and logs every command with its measured wall (commands.sh, walls.json).
- Study is one study's runs: train.py runs and evaluate.py evaluations named by a hash of their whole argv, so a
  rerun skips what exists with the same argv and any other flag makes new ones.
- The time model of `reproduce.py --dry-run` (command_seconds, estimate, timing_md): seconds per planned command,
  fitted on one machine and scaled by the default job's steps/s.

Library file: imports data.py and verdicts.py (exact counts of a metrics file), never a script; reproduce.py imports it.
"""
import contextlib
import hashlib
import importlib
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import data
from verdicts import exact

REPO = os.path.dirname(os.path.abspath(__file__))

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


# ----------------------------------------------------------------------------- running the CLIs
def digest(argv):
    """A short hash of an argv: the name of the runs and evaluations it makes."""
    return hashlib.sha1(shlex.join([str(a) for a in argv]).encode()).hexdigest()[:10]


class Runner:
    """Runs `python <script>.py argv` (subprocess, or main(argv) in this process), logging every command and its
    measured wall (walls.json, by command line, kept across invocations)."""

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
        t0 = time.time()
        if self.args.in_process:
            main = importlib.import_module(script).main
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
                main(argv)
            out = buf.getvalue()
        else:
            r = subprocess.run([sys.executable, f"{script}.py", *argv], cwd=REPO, check=True, text=True,
                               stdout=subprocess.PIPE if capture else None)
            out = r.stdout or ""
        walls = self.walls()
        walls[line] = round(time.time() - t0, 2)
        with data.atomic_write(os.path.join(self.out, "walls.json"), "w") as f:
            json.dump(walls, f, indent=0)
        return out

    def walls(self):
        """{command line: seconds} of every command this study's folder has timed."""
        path = os.path.join(self.out, "walls.json")
        return json.load(open(path)) if os.path.isfile(path) else {}


class Study:
    """The runs of one study: train (skipped when done.json holds the same argv), evaluate (skipped when its JSON
    exists; its name hashes the argv). fresh: plan as if nothing were on disk (the time table's full plan)."""

    def __init__(self, args, fresh=False):
        self.args, self.fresh = args, fresh
        self.out = os.path.join(args.out_dir, args.study)
        self.run = Runner(args, self.out)
        self.extra_train = shlex.split(args.train_args)
        self.extra_eval = shlex.split(args.eval_args)
        self.planned = set()  # runs, evaluations and transfers already issued in this invocation
        self.seed_list = list(args.seeds)  # the seeds of the current stage: design, then design + confirmation
        self.results, self.claims, self.positive = {}, [], None

    def train(self, name, seed, flags, steps=None, init=None, final=None):
        """One train.py run: <--train-args> + flags, --seed, --max-steps; returns its directory, named by a hash of
        the argv with --max-steps = final (default: steps), so the resumed segments of one fine-tune share it."""
        a = self.args
        steps = steps or a.steps

        def argv(d, n):
            return [str(x) for x in [*self.extra_train, *flags, "--seed", seed, "--max-steps", n, "--out-dir", d,
                                     "--device", a.device, *(["--init-from", init] if init else [])]]
        d = os.path.join(self.out, f"{name}_s{seed}_{digest(argv('', final or steps))}")  # the row's own flags win
        cmd, done = argv(d, steps), os.path.join(d, "done.json")
        finished = json.load(open(done)).get("finished", []) if os.path.isfile(done) else []
        if (d, steps) in self.planned or (not self.fresh and cmd in finished):
            return d
        self.planned.add((d, steps))
        self.run("train", cmd)
        if not a.dry_run:  # every finished argv of the directory (the segments of a fine-tune resume in it)
            with data.atomic_write(done, "w") as f:
                json.dump({"steps": steps, "argv": cmd, "finished": [*finished, cmd]}, f)
        return d

    def evaluate(self, ckpt, tag, flags=(), fid=True, deciding=True):
        """evaluate.py on a checkpoint -> its metrics dict with exact counts (exact(); None in a dry run); N =
        --num-samples where the result decides a verdict, else --aux-samples (at most --num-samples). The JSON is
        named by a hash of the whole argv, so any other flag re-scores."""
        a = self.args
        n = a.num_samples if deciding else min(a.aux_samples, a.num_samples)
        fid_flags = ["--ref", "heldout", "--ref-max", a.ref_max] if (fid and a.fid) else ["--no-fid", "--ref",
                                                                                           "heldout"]
        rest = ["--num-samples", n, "--steps", a.eval_steps, "--batch-size", a.eval_batch, "--device", a.device,
                *self.extra_eval, *fid_flags, *flags]
        for flag in ("judge_train", "cache_dir", "inception_path", "lpips_alex_path"):
            if getattr(a, flag) is not None:
                rest += ["--" + flag.replace("_", "-"), getattr(a, flag)]
        rest = [str(x) for x in rest]
        out = f"{os.path.splitext(ckpt)[0]}_{tag}_n{n}_{digest([ckpt, *rest])}_eval.json"
        if out in self.planned or (not self.fresh and os.path.isfile(out)):
            return None if a.dry_run else exact(json.load(open(out)), out)
        self.planned.add(out)
        self.run("evaluate", ["--ckpt", ckpt, "--out", out, *rest])
        return None if a.dry_run else exact(json.load(open(out)), out)

    def seeds(self, fn, design_only=False):
        """fn(seed) -> metrics dict, for every seed of the stage (design_only: the design seeds, for the rows that
        only the positive control reads): {key: [values over seeds]}."""
        per = [fn(s) for s in (self.args.seeds if design_only else self.seed_list)]
        if any(p is None for p in per):
            return {}
        return {k: [p.get(k) for p in per] for k in set().union(*per)}


# ----------------------------------------------------------------------------- time estimate (--dry-run)
def command_seconds(plan, a, rate=None):
    """Seconds of each planned command at `rate` steps/s of the default job (default: --steps-per-s), by the time
    model above (training steps and guided sampling scaled by tokens and text, start-up per command, the FID network
    per image), and the seconds spent once per study (the judge and the held-out reference once per resolution)."""
    rate = rate or a.steps_per_s
    slow = CAL_STEPS_PER_S / rate
    per, res = [], {}
    for script, argv in plan:
        opt = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
        sec = START_S * slow
        if script == "train":
            r = int(opt.get("--resolution", data.RESOLUTION))
            text = TEXT_COST if opt.get("--semantic") == "text" else 1.0
            res[opt["--out-dir"]] = (r, text)
            prev = res.get(opt["--out-dir"] + ":steps", 0)  # fine-tune segments resume
            steps = int(opt["--max-steps"]) - prev
            res[opt["--out-dir"] + ":steps"] = int(opt["--max-steps"])
            sec += steps / rate * (r / REF_RES) ** TOKEN_EXP * text
        elif script == "evaluate":
            ck = opt["--ckpt"]
            r, text = res.get(os.path.dirname(ck), (2 * a.low_res if "_init" in ck else data.RESOLUTION, 1.0))
            n, s = int(opt["--num-samples"]), int(opt["--steps"])
            lp = int(opt.get("--lpips-prompts", 0)) * 5
            sec += (n + lp) * s * SAMPLE_COST / REF_BATCH / rate * (r / REF_RES) ** TOKEN_EXP * text
            sec += INCEPTION_S * n if "--no-fid" not in argv else 0
        per.append(sec)
    n_res = len({2 * a.low_res, a.low_res}) if a.study == "transfer" else 1  # held-out references, cached after
    once = JUDGE_S * slow * n_res + (INCEPTION_S * (a.ref_max + a.num_samples) * n_res if a.fid else 0)
    return per, once


def estimate(plan, a, rate=None):
    """Seconds of the planned commands and the once-per-study work at `rate` (command_seconds)."""
    per, once = command_seconds(plan, a, rate)
    return sum(per) + once


def timing_md(plan, a, walls, wall):
    """Markdown: the --dry-run time model's estimate of each kind of command in the study's full plan beside the
    walls measured for those commands (walls.json), and the study's wall."""
    slow, once_slow = command_seconds(plan, a)
    cal, once_cal = command_seconds(plan, a, CAL_STEPS_PER_S)
    rows, order = {}, []
    for (script, argv), s1, s2 in zip(plan, slow, cal):
        if script not in rows:
            rows[script] = [0, 0.0, 0.0, 0.0, 0]
            order.append(script)
        w = walls.get(shlex.join(["python", f"{script}.py", *argv]))
        r = rows[script]
        r[0], r[1], r[2] = r[0] + 1, r[1] + s1, r[2] + s2
        if w is not None:
            r[3], r[4] = r[3] + w, r[4] + 1

    def line(name, n, e1, e2, meas):
        return f"| {name} | {n} | {minsec(e1)} | {minsec(e2)} | {meas} |"
    out = [f"| commands | count | estimate at {a.steps_per_s:g} steps/s | estimate for {CAL_MACHINE} at "
           f"{CAL_STEPS_PER_S:g} steps/s | measured |",
           "|---|---|---|---|---|"]
    for script in order:
        n, e1, e2, w, k = rows[script]
        out.append(line(f"{script}.py", n, e1, e2, f"{minsec(w)} ({k} of {n} timed)" if k else "—"))
    out.append(line("judge, held-out references (once per study; inside the commands' walls)", "—", once_slow,
                    once_cal, "—"))
    timed = sum(r[3] for r in rows.values())
    out.append(line("**all**", len(plan), sum(slow) + once_slow, sum(cal) + once_cal,
                    f"{minsec(timed)} in the commands; {minsec(wall)} wall of the study"))
    return "\n".join(out)

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
