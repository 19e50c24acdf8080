"""Tests of reproduce.py: the verdict rule (exact counts, paired t-test, sampling floor, confirmation seeds, power),
each study's positive control, the argv-keyed caches, and the studies end to end at a few steps:
`.venv/bin/python -m pytest -q test_reproduce.py` (the two end-to-end tests take a minute or two on 2 cores)."""
import contextlib
import fractions
import io
import json
import math
import os
import re
import shlex
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail at once, never retry

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from scipy import stats  # noqa: E402

import evaluate  # noqa: E402
import reproduce  # noqa: E402
import verdicts  # noqa: E402

TINY_TRAIN = "--global-batch 4 --warmup 1 --sample-every 0 --log-every 1 --no-progress"


def _f32(k, n):
    """What evaluate.py writes for k of n images: the float32 fraction, read back as a Python float."""
    return float(np.float32(k) / np.float32(n))


def _judge_row(counts, n=500):
    """A row of per-seed judge metrics as reproduce's results hold them, from evaluate.py-style float32 JSONs."""
    per = [verdicts.exact({"judge_acc": _f32(k, n), "judge_n": n, "judge_chance": 0.1}) for k in counts]
    return {key: [p.get(key) for p in per] for key in per[0]}


# ----------------------------------------------------------------------------- the verdict rule
def test_verdict_rule():
    """The float32 boundary case is not 'reproduced'; one image per seed never counts; the paired t-test's p equals
    the closed form of Student's t with 2 degrees of freedom; confirmation seeds and the positive control gate a
    decisive verdict; accuracies are exact counts."""
    # 67/69/90 vs 65/66/89 of 500: Δ = -2, -3, -1 images, |mean Δ| = 2·sd(Δ) exactly. In float32 the old ±2 sd rule
    # saw |mean| − 2·sd > 0 and called it reproduced
    base, treat = _judge_row([67, 69, 90]), _judge_row([65, 66, 89])
    assert base["judge_acc_k"] == [67, 69, 90] and base["judge_acc"][0] == 67 / 500  # exact, float64
    d = verdicts.paired_deltas(base, treat, "judge_acc")
    assert d == [-2 / 500, -3 / 500, -1 / 500]
    floor = verdicts.sampling_floor(base, treat, "judge_acc")
    pb, pt = (67 + 69 + 90) / 1500, (65 + 66 + 89) / 1500
    assert floor == pytest.approx(math.sqrt(pb * (1 - pb) / 500 + pt * (1 - pt) / 500), rel=1e-12)
    s = verdicts.claim_stats(d, floor, confirm=[-2 / 500, -2 / 500])
    # t = mean / (sd / √3) = -2√3; Student's t with 2 df: two-sided p = 1 − |t| / sqrt(2 + t²) = 1 − sqrt(6/7)
    assert s["t"] == pytest.approx(-2 * math.sqrt(3), rel=1e-12)
    assert s["p"] == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-10) and 0.074 < s["p"] < 0.075
    assert reproduce.verdict(d, -1, floor, confirm=[-2 / 500, -2 / 500]) == "no effect"
    assert reproduce.verdict(d, -1, 0.0, confirm=[-2 / 500, -2 / 500]) == "no effect"  # p > 0.05 even without floor
    # one image per seed, every seed: no spread (p = 0), but below the metric's own sampling error: never counts
    one = [1 / 500] * 3
    assert verdicts.claim_stats(one, floor)["p"] == 0.0
    assert reproduce.verdict(one, +1, floor, confirm=[1 / 500, 1 / 500]) == "no effect"
    assert reproduce.verdict(one, +1, 1e-4, confirm=[1 / 500, 1 / 500]) == "reproduced"  # it is the floor that stops it
    small = {"judge_acc": [0.5], "judge_acc_n": [500]}
    assert verdicts.sampling_floor(small, small, "judge_acc") == pytest.approx(math.sqrt(0.5 / 500), rel=1e-12)
    tiny = {"judge_acc": [0.0], "judge_acc_n": [500]}  # no binomial spread at p = 0: the 2-image minimum
    assert verdicts.sampling_floor(tiny, tiny, "judge_acc") == 2 / 500
    # a known p: Δ = 0.048, 0.055, 0.052 (the padding pilot's noisy − zero)
    d = [0.048, 0.055, 0.052]
    m, sd = np.mean(d), np.std(d, ddof=1)
    t = m / (sd / math.sqrt(3))
    s = verdicts.claim_stats(d, 0.03)
    assert s["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert s["p"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue, rel=1e-12) and s["p"] < 0.05
    assert reproduce.verdict(d, +1, 0.03, confirm=[0.05, 0.04]) == "reproduced"
    assert reproduce.verdict(d, -1, 0.03, confirm=[0.05, 0.04]) == "contradicted"
    assert reproduce.verdict(d, +1, 0.03, confirm=[-0.05, 0.01]) == "no effect"  # the confirmation's sign differs
    assert reproduce.verdict(d, +1, 0.03, confirm=[0.01, 0.02]) == "no effect"  # the confirmation is below the floor
    assert reproduce.verdict(d, +1, 0.03) == "no effect"  # no confirmation seeds: nothing decisive
    assert reproduce.verdict(d, +1, 0.06, confirm=[0.07, 0.07]) == "no effect"  # mean Δ 0.052 below the floor
    assert reproduce.verdict(d, +1, float("nan"), confirm=[0.05, 0.04]) == "no effect"  # floor unknown
    # a failed positive control: inconclusive, whatever the seeds say
    assert reproduce.verdict(d, +1, 0.03, [0.05, 0.04], absent="size conditioning") == \
        "inconclusive: size conditioning absent"
    assert reproduce.VERDICTS == ("reproduced", "contradicted", "no effect", "inconclusive")
    assert all(word in reproduce.VERDICT_RULE for word in reproduce.VERDICTS)
    # one seed: no test; 'no effect' with an infinite MDE
    s = verdicts.claim_stats([0.2], 0.03)
    assert s["p"] == 1.0 and s["mde"] == float("inf") and reproduce.verdict([0.2], +1, 0.03, [0.2]) == "no effect"
    # an accuracy that is not k of n images is refused in one line naming the file
    with pytest.raises(SystemExit, match="x_eval.json: judge_acc"):
        verdicts.exact({"judge_acc": 0.1341, "judge_n": 500}, "x_eval.json")
    cap = verdicts.exact({"caption_shape": _f32(60, 500), "caption_side": _f32(480, 500),
                           "caption_colour": _f32(450, 500), "caption_n": 500})
    assert cap["caption_mean_k"] == 990 and cap["caption_mean"] == 990 / 1500 and cap["caption_mean_n"] == 500


def test_power_and_seeds():
    """Power of the paired t-test (noncentral t) is alpha at no effect and rises with n; seeds_for_power is the
    first n reaching 80 %; the MDE is the effect detected with 80 %; the pilot numbers set five seeds where three
    cannot detect the sampling floor."""
    assert verdicts.power(3, 0.0, 0.01) == pytest.approx(0.05, abs=1e-12)
    # power by simulation of the t-test: 20000 paired experiments of n = 5 seeds, effect 0.02, sd 0.015
    rng = np.random.default_rng(0)
    sims = rng.normal(0.02, 0.015, size=(20000, 5))
    hit = (stats.ttest_1samp(sims, 0.0, axis=1).pvalue < 0.05).mean()
    assert abs(verdicts.power(5, 0.02, 0.015) - hit) < 4 * math.sqrt(hit * (1 - hit) / 20000)
    pilot = [0.010, 0.007, -0.015]  # padding's noisy − replicate: sd(Δ) 0.0137
    sd = np.std(pilot, ddof=1)
    n = verdicts.seeds_for_power(pilot, 0.0297)
    assert verdicts.power(n, 0.0297, sd) >= 0.8 > verdicts.power(n - 1, 0.0297, sd) and n == 4
    assert verdicts.power(5, verdicts.mde(5, sd), sd) == pytest.approx(0.8, abs=1e-6)
    assert reproduce.design_seeds("guidance") == 3 and reproduce.design_seeds("control") == 3
    assert reproduce.design_seeds("padding") == 5 and reproduce.design_seeds("flip") == 5
    args = reproduce.parse(["padding"])
    assert args.seeds == [0, 1, 2, 3, 4] and args.confirm_seeds == [5, 6]
    assert reproduce.parse(["guidance"]).confirm_seeds == [3, 4]
    with pytest.raises(SystemExit, match="--confirm-seeds 2 5"):
        reproduce.parse(["guidance", "--confirm-seeds", "2", "5"])


# ----------------------------------------------------------------------------- positive controls
def _pc(study, results, argv=()):
    """reproduce.positive_control on synthetic per-seed rows."""
    args = reproduce.parse([study, "--seeds", "0", "1", "2", *argv])
    return reproduce.positive_control(types.SimpleNamespace(args=args, results=results))


def _dist_row(dist, floor=0.001, sd=0.002, prompts=100):
    """A control row of three seeds: the size distances, their 8-bit floor, sd over prompts and prompts."""
    return {"lpips": list(dist), "lpips_floor": [floor] * 3, "lpips_sd": [sd] * 3, "lpips_prompts": [prompts] * 3}


def _acc_row(key, counts, n, chance):
    """A row of three seeds of an accuracy: counts of n images and the chance level."""
    return {key: [k / n for k in counts], f"{key}_n": [n] * 3, f"{key}_chance": [chance] * 3}


def test_positive_controls():
    """Each study's positive control is computed on its rows against its floor and fails for a run that ignores
    what the claim acts on; the size-conditioning distance and its 8-bit floor come from evaluate.py's protocol."""
    # control / guidance: distance across sizes vs the 8-bit floor; threshold = floor + max(3 SE, floor) = 0.002
    for study, row in (("control", "uniform"), ("guidance", 1.0)):
        ok = _pc(study, {row: _dist_row([0.01, 0.012, 0.011])})
        assert ok["passed"] and ok["rows"][row]["threshold"] == pytest.approx(0.002, rel=1e-12)
        assert not _pc(study, {row: _dist_row([0.001, 0.0011, 0.0009])})["passed"]  # at the floor: absent
        assert _pc(study, {})["passed"] is None  # not measured (a dry run)
    # chance kind: threshold = chance + max(3·sqrt(c(1 − c)/N), 0.25·(1 − c))
    side = _pc("flip", {"flips-off": _acc_row("caption_side", [480, 482, 470], 500, 0.5)})
    assert side["passed"] and side["rows"]["flips-off"]["threshold"] == pytest.approx(0.625, rel=1e-12)
    assert not _pc("flip", {"flips-off": _acc_row("caption_side", [250, 255, 245], 500, 0.5)})["passed"]
    assert not _pc("flip", {"flips-off": _acc_row("caption_side", [312, 312, 312], 500, 0.5)})["passed"]  # 0.624
    assert _pc("flip", {"flips-off": _acc_row("caption_side", [313, 313, 313], 500, 0.5)})["passed"]  # 0.626
    cap = _acc_row("caption_mean", [330, 340, 335], 500, 0.24)
    assert _pc("padding", {"noisy": cap})["passed"] and _pc("captions", {"baseline": cap})["passed"]
    assert not _pc("padding", {"noisy": _acc_row("caption_mean", [120, 125, 118], 500, 0.24)})["passed"]
    # transfer: each pre-trained model; threshold at N = 100, chance 0.1: 0.1 + max(0.09, 0.225) = 0.325
    good, bad = _acc_row("pre_judge_acc", [60, 55, 58], 100, 0.1), _acc_row("pre_judge_acc", [12, 13, 11], 100, 0.1)
    tr = _pc("transfer", {"baseline": good, "local": good})
    assert tr["passed"] and tr["rows"]["local"]["threshold"] == pytest.approx(0.325, rel=1e-12)
    assert not _pc("transfer", {"baseline": good, "local": bad})["passed"]
    line = reproduce.positive_md(tr, reproduce.parse(["transfer", "--seeds", "0", "1", "2"]))
    assert line.startswith("positive control (class drawing at 8 px)") and line.endswith("**passed**")
    # the protocol itself: a generator that ignores the size condition has distance 0 < its 8-bit floor (fails);
    # one whose image moves with the size passes
    sizes = [4, 8, 16, 32, 64]

    def gen(uses_size):
        def g(seeds, labels, sz):  # a smooth image per seed; with uses_size, shifted by 0.05 per octave of size
            x = torch.stack([torch.sin(torch.arange(3 * 16 * 16, dtype=torch.float32).view(3, 16, 16) * 0.37 + s)
                             * 0.8 for s in seeds])
            shift = 0.05 * torch.log2(torch.tensor(sz, dtype=torch.float32)).view(-1, 1, 1, 1)
            return (x + shift if uses_size else x).clamp(-1, 1)
        return g
    for uses, want in ((False, False), (True, True)):
        la, _, lf = evaluate.lpips_size_protocol(evaluate.pixel_distance, gen(uses), [0, 1, 2], [5, 6, 7], sizes,
                                                 resolution=16, upsample=False, with_floor=True)
        assert (lf > 0).all() and (la < 1e-7).all() != uses  # the floor: 8-bit rounding, ~0.25 level per pixel
        assert abs(lf.mean() - 0.25 / 255) < 0.1 / 255
        row = {"lpips": [la.mean()] * 3, "lpips_floor": [lf.mean()] * 3, "lpips_sd": [la.std(ddof=1)] * 3,
               "lpips_prompts": [3] * 3}
        assert _pc("control", {"uniform": row})["passed"] == want


def test_positive_control_gates_claims():
    """A failed positive control makes the claims it gates 'inconclusive: <capability> absent', even one whose Δ is
    decisive on both seed sets; a claim is gated by the control's rows among those it compares."""
    args = reproduce.parse(["control", "--seeds", "0", "1", "2", "--confirm-seeds", "3", "4"])
    big = dict(lpips_floor=[0.001] * 5, lpips_sd=[0.001] * 5, lpips_prompts=[100] * 5)
    res = {"uniform": {"lpips": [0.05, 0.051, 0.049, 0.05, 0.05], **big},
           "cosine": {"lpips": [0.01, 0.011, 0.009, 0.01, 0.01], **big}}
    study = types.SimpleNamespace(args=args, results=res, positive=None)
    study.positive = reproduce.positive_control(study)
    assert [c["verdict"] for c in reproduce.claims(study, res)] == ["reproduced"]
    res["uniform"]["lpips_floor"] = [0.03] * 5  # the same distances, a floor that hides them
    study.positive = reproduce.positive_control(study)
    assert [c["verdict"] for c in reproduce.claims(study, res)] == ["inconclusive: size conditioning absent"]
    # transfer: each claim is gated by the pre-trainings its rows start from. A local pre-training that fails its
    # control leaves the local claim inconclusive and the PE claims (the baseline's pre-training) decided
    args = reproduce.parse(["transfer", "--seeds", "0", "1", "2", "--confirm-seeds", "3", "4"])
    n = 500

    def row(counts, pre):
        return {"judge_acc@200": [k / n for k in counts], "judge_acc_n@200": [n] * 5,
                "pre_judge_acc": [k / 100 for k in pre], "pre_judge_acc_n": [100] * 5, "pre_judge_acc_chance": [0.1] * 5}
    res = {"baseline": row([200, 210, 205, 200, 207], [40] * 5), "extrapolate": row([150, 158, 152, 149, 151], []),
           "no-rescale": row([201, 209, 206, 199, 208], []), "local": row([240, 250, 245, 244, 246], [15] * 5)}
    study = types.SimpleNamespace(args=args, results=res, positive=None)
    study.positive = reproduce.positive_control(study)
    assert study.positive["passed"] is False and study.positive["rows"]["baseline"]["passed"]
    got = {c["treatment"]: c["verdict"] for c in reproduce.claims(study, res, final=200)}
    assert got == {"extrapolate": "reproduced", "no-rescale": "no effect",
                   "local": "inconclusive: class drawing at 8 px absent"}, got
    assert "baseline: 0.4" in reproduce.positive_md(study.positive, args) and "(failed)" in \
        reproduce.positive_md(study.positive, args)


# ----------------------------------------------------------------------------- caches keyed by the argv
def test_reproduce_cache_keys(tmp_path):
    """A rerun with the same flags runs nothing; another --lam or --eval-steps re-evaluates without training;
    other --train-args train anew."""
    common = ["guidance", "--in-process", "--seeds", "0", "--betas", "1", "--steps", "2", "--num-samples", "2",
              "--eval-steps", "1", "--eval-batch", "4", "--judge-train", "64", "--lpips-net", "pixel",
              "--lpips-prompts", "1", "--device", "cpu", "--out-dir", str(tmp_path / "repro"), "--cache-dir",
              str(tmp_path / "cache"), "--eval-args", "--judge-heldout 10"]
    log = tmp_path / "repro" / "guidance" / "commands.sh"

    def ran(*extra, train=TINY_TRAIN):
        before = len(log.read_text().splitlines()) if log.exists() else 0
        with contextlib.redirect_stdout(io.StringIO()):
            reproduce.main([*common, "--train-args", train, *extra])
        return [c.split()[1] for c in log.read_text().splitlines()[before:]]
    assert ran() == ["train.py", "evaluate.py"]
    assert ran() == []
    assert ran("--lam", "2") == ["evaluate.py"] and ran("--lam", "2") == []
    assert ran("--eval-steps", "2") == ["evaluate.py"]
    assert ran(train=TINY_TRAIN + " --lr 2e-4") == ["train.py", "evaluate.py"]
    walls = json.load(open(tmp_path / "repro" / "guidance" / "walls.json"))
    assert len(walls) == 6 and all(w >= 0 for w in walls.values())


# ----------------------------------------------------------------------------- end to end at a few steps
def test_reproduce_smoke(tmp_path):
    """What test_reproduce_all leaves out: control with AlexNet LPIPS and FID (on a handful of images) and the
    captions levers, each at a few steps (16 px, 2 samples) in this process, writing its table and JSON; a rerun
    skips every run and evaluation (no new command); every study's --dry-run estimates its design stage and says
    when it is over the budget, and estimates the confirmation stage apart."""
    alex = tmp_path / "alex.pth"
    torch.save({f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}, alex)
    common = ["--seeds", "0", "--steps", "2", "--num-samples", "2", "--eval-steps", "2", "--eval-batch", "4",
              "--judge-train", "256", "--in-process", "--device", "cpu", "--out-dir", str(tmp_path / "repro"),
              "--cache-dir", str(tmp_path / "cache"), "--lpips-alex-path", str(alex), "--train-args",
              "--resolution 16 " + TINY_TRAIN, "--eval-args", "--judge-heldout 20"]
    studies = {"control": ["--lpips-prompts", "2", "--fid", "--ref-max", "4"], "captions": []}
    for study, flags in studies.items():
        reproduce.main([study] + common + flags)
        out = tmp_path / "repro" / study
        md = (out / f"{study}.md").read_text()
        assert md.startswith("## ") and "| " in md and "paper" in md and "\npositive control (" in md
        res = json.load(open(out / f"{study}.json"))["results"]
        assert res, study
        n_cmds = len((out / "commands.sh").read_text().splitlines())
        reproduce.main([study] + common + flags)  # rerun: everything is on disk
        assert len((out / "commands.sh").read_text().splitlines()) == n_cmds, f"{study} rerun ran commands"
    ctl = json.load(open(tmp_path / "repro" / "control" / "control.json"))["results"]
    assert set(ctl) == {"uniform", "cosine"} and all(np.isfinite(ctl[k]["lpips"][0]) and ctl[k]["lpips_floor"][0] > 0
                                                     and np.isfinite(ctl[k]["fid"][0]) for k in ctl)
    cap = json.load(open(tmp_path / "repro" / "captions" / "captions.json"))["results"]
    assert set(cap) == {name for name, *_ in reproduce.LEVERS} and 0 <= cap["center"]["caption_side"][0] <= 1
    for study in [*reproduce.STUDIES, "captions"]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            reproduce.main([study, "--dry-run", "--out-dir", str(tmp_path / "dry")])
        text = buf.getvalue()
        slow, cal = map(float, re.search(r"estimated (\d+) min at 2.5 .*; (\d+) min on", text).groups())
        assert slow > cal > 0 and ("(over the budget)" in text) == (cal > reproduce.BUDGET_S / 60), (study, cal)
        assert re.search(r"confirmation seeds [\d ]+ \(trained only when .*: \d+ more commands, \+\d+ min", text)
        n = reproduce.design_seeds(study)
        assert re.search(rf"--seed {n - 1} ", text) and not re.search(rf"--seed {n + 2} ", text), study


def _tables(body):
    """The markdown tables of a block: lists of rows of cells (the header first, the rule line dropped)."""
    out, cur = [], []
    for ln in body.splitlines() + [""]:
        if ln.startswith("|"):
            if not ln.startswith("|---"):
                cur.append([c.strip() for c in ln.strip().strip("|").split("|")])
        elif cur:
            out.append(cur)
            cur = []
    return out


# table column -> (metric key in the eval JSONs, digits); proportions are recomputed as exact counts here
COLUMNS = {"pixel distance": ("lpips", 4), "8-bit floor": ("lpips_floor", 4), "pixel distance/HR": ("lpips_hr", 4),
           "judge": ("judge_acc", 3), "judge ceiling": ("judge_ceiling", 3), "shape": ("caption_shape", 3),
           "side": ("caption_side", 3), "side (left/right)": ("caption_side", 3), "colour": ("caption_colour", 3),
           "mean": ("caption_mean", 3)}
NS = {"judge_acc": "judge_n", "caption_shape": "caption_n", "caption_side": "caption_n", "caption_colour": "caption_n"}


def _value(m, key):
    """A metric of an eval JSON as a count: (k, d) for accuracies, else (value, None)."""
    if key in NS:
        n = m[NS[key]]
        return round(m[key] * n), n
    if key == "caption_mean":
        parts = [_value(m, f"caption_{p}")[0] for p in ("shape", "side", "colour")]
        return sum(parts), 3 * m["caption_n"]
    return m.get(key), None


def _seed_values(row, key, at=""):
    """Per seed (value, count or None) of a results row, read from the eval JSONs its _path entries name."""
    out = []
    for path in row[f"_path{at}"]:
        v, d = _value(json.load(open(path)), key)
        out.append((v / d if d else v, (v, d) if d else None))
    return out


def _check_block(study, body, res, args):
    """Every cell of the study's main table and every claim's Δ, floor and verdict against what the run JSONs and
    reproduce.verdict give."""
    main, *rest = _tables(body)[1:]  # [0] is the timing table
    header = main[0]
    rows = res["curves"] if study == "transfer" else res
    key = {str(k): k for k in rows}
    for cells in main[1:]:
        name = next(k for k in key if k == cells[0] or (study == "guidance" and float(k) == float(cells[0])))
        row = rows[name]
        for h, cell in zip(header, cells):
            m = re.fullmatch(r"judge @(\d+)", h)
            if h in COLUMNS:
                metric, digits, at = *COLUMNS[h], ""
            elif m:
                metric, digits, at = "judge_acc", 3, "@" + m.group(1)
            elif h.endswith("(pre-trained)") and "pre__path" in row and name in ("baseline", "local"):
                metric, digits, at = "judge_acc", 3, "PRE"
            else:
                continue
            if at == "PRE":
                vals = [v for v, _ in _seed_values({"_path": row["pre__path"]}, metric)]
            else:
                vals = [v for v, _ in _seed_values(row, metric, at)]
            assert cell == verdicts.fmt(vals, digits), (study, name, h, cell, vals)
    claims_tab = next(t for t in rest if t[0][0] == "claim")
    pos = re.search(r"\npositive control \(([^)]*)\).*\*\*(passed|failed)\*\*", body)
    assert pos, study
    nd = len(args["seeds"])
    for cells, (text, metric, base, treat, sign) in zip(claims_tab[1:], reproduce.CLAIMS[study]):
        at = "@" + metric.split("@")[1].format(final=args["steps"]) if "@" in metric else ""
        m = metric.split("@")[0]
        b, t = (_seed_values(rows[next(k for k in key if k == str(r))], m, at) for r in (base, treat))
        deltas = [float(fractions.Fraction(*tc) - fractions.Fraction(*bc)) if bc else tv - bv
                  for (bv, bc), (tv, tc) in zip(b, t)]
        if m == "lpips":
            sd = [[json.load(open(p))["lpips_sd"] for p in rows[str(r)]["_path"]][:nd] for r in (base, treat)]
            floor = math.sqrt(sum(np.mean(np.square(s)) for s in sd) / args["lpips_prompts"])
        else:
            n = json.load(open(rows[str(base)][f"_path{at}"][0]))[NS.get(m, "caption_n")]
            pb, pt = (np.mean([v for v, _ in x[:nd]]) for x in (b, t))
            floor = max(math.sqrt((pb * (1 - pb) + pt * (1 - pt)) / n), 2 / n)
        absent = pos.group(1) if pos.group(2) == "failed" else None
        want = reproduce.verdict(deltas[:nd], sign, floor, deltas[nd:] or None, absent)
        assert cells[-1] == f"**{want}**", (study, text, cells[-1], want)
        assert cells[3] == ", ".join(f"{v:+.3f}" for v in deltas[:nd]), (study, text)
        assert cells[6] == ("—" if not math.isfinite(floor) else f"{floor:.4f}"), (study, text, cells[6], floor)


def test_reproduce_all(tmp_path):
    """`reproduce.py all` at a few steps with 2 seeds runs the five studies and writes their blocks into --results:
    every cell of each table and every verdict equals what the run JSONs and reproduce.verdict give, each block has
    its positive control, the time table and the wall; transfer's fine-tune runs differ from the baseline's in one
    flag each; a second `all` runs nothing, replaces the blocks and keeps the text around them."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept before\n\n<!-- reproduce:flip -->\nold flip table\n<!-- /reproduce:flip -->"
                       "\n\nkept after\n")
    argv = ["all", "--in-process", "--seeds", "0", "1", "--steps", "2", "--pre-steps", "2", "--num-samples", "2",
            "--eval-steps", "1", "--eval-batch", "4", "--judge-train", "256", "--lpips-net", "pixel",
            "--lpips-prompts", "2", "--lams", "1.5", "--device", "cpu", "--out-dir", str(tmp_path / "repro"),
            "--cache-dir", str(tmp_path / "cache"), "--results", str(results), "--train-args", TINY_TRAIN,
            "--eval-args", "--judge-heldout 20"]
    reproduce.main(argv)
    first = results.read_text()
    for study in reproduce.STUDIES:
        block = re.search(f"<!-- reproduce:{study} -->(.*?)<!-- /reproduce:{study} -->", first, re.S)
        assert block, study
        body = block.group(1)
        assert re.search(r"\d ± \d", body), study
        assert re.search(r"\*\*(reproduced|contradicted|no effect|inconclusive: [^*]+ absent)\*\*", body), study
        assert "estimate: " in body and "for the Zen 4" in body and "wall" in body, study
        assert re.search(r"\| \*\*all\*\* \| \d+ \| \d+ min \d+ s \| \d+ min \d+ s \| \d+ min \d+ s in the commands",
                         body), study
        saved = json.load(open(tmp_path / "repro" / study / f"{study}.json"))
        _check_block(study, body, saved["results"], saved["args"])
    assert "old flip table" not in first and "kept before" in first and first.rstrip().endswith("-->")
    pad = json.load(open(tmp_path / "repro" / "padding" / "padding.json"))["results"]
    assert set(pad) == {"zero", "replicate", "noisy"} and all(0 <= v <= 1 for v in pad["zero"]["caption_side"])
    flip = json.load(open(tmp_path / "repro" / "flip" / "flip.json"))["results"]
    assert set(flip) == {"flip", "no-flip", "flips-off", reproduce.MIRROR}
    tr = json.load(open(tmp_path / "repro" / "transfer" / "transfer.json"))["results"]
    assert set(tr["curves"]) == {"baseline", "extrapolate", "no-rescale", "local"}
    assert "judge_acc@2" in tr["curves"]["local"] and (tmp_path / "repro" / "transfer" / "transfer_judge.png").exists()

    def flags(cmd):  # each fine-tune run differs from the baseline's in one flag only (local: its pre-training)
        t = shlex.split(cmd)[2:]
        out = {}
        for k, a in enumerate(t):  # argparse semantics: the last occurrence wins
            if a.startswith("--"):
                out[a] = t[k + 1] if k + 1 < len(t) and not t[k + 1].startswith("--") else True
        return {k: v for k, v in out.items() if k not in ("--out-dir", "--init-from")}
    cmds = [c for c in (tmp_path / "repro" / "transfer" / "commands.sh").read_text().splitlines()
            if c.startswith("python train.py") and "--max-steps 2 " in c]
    ft = {re.search(r"ft16_([a-z-]+)_s0_", c).group(1): flags(c) for c in cmds if "ft16_" in c and "_s0_" in c}
    base = ft["baseline"]
    assert base["--resolution"] == "16" and base["--pe-base"] == "4" and float(base["--schedule-scale"]) == 2
    diff = {name: {k for k in set(base) | set(f) if base.get(k) != f.get(k)} for name, f in ft.items()}
    assert diff == {"baseline": set(), "extrapolate": {"--pe-grid"}, "no-rescale": {"--schedule-scale"}, "local": set()}
    pre = [flags(c) for c in (tmp_path / "repro" / "transfer" / "commands.sh").read_text().splitlines()
           if "/pre8" in c and "_s0_" in c and c.startswith("python train.py")]
    assert len(pre) == 2 and {k for k in set(pre[0]) | set(pre[1]) if pre[0].get(k) != pre[1].get(k)} == {"--crop"}
    reproduce.main(argv)  # everything is on disk: no run, the same blocks rewritten in place
    second = results.read_text()
    for study in reproduce.STUDIES:
        assert second.count(f"<!-- reproduce:{study} -->") == 1 == second.count(f"<!-- /reproduce:{study} -->")
    assert second.index("kept before") < second.index("<!-- reproduce:flip -->") < second.index("kept after")
    # the rerun ran nothing, so each block keeps the wall time and command count of the run that made it
    walls = lambda text: re.findall(r"`: (\d+ min \d+ s wall \(\d+ commands)", text)  # noqa: E731
    assert len(walls(second)) == 5 and walls(second) == walls(first) and "(0 commands" not in second


def test_block_command():
    """A block shows the command that made its numbers, without the file it was written to."""
    assert reproduce.block_command("control", ["all", "--lpips-net", "pixel", "--results", "/x/R.md"]) == \
        "python reproduce.py control --lpips-net pixel"
    assert reproduce.block_command("flip", ["flip", "--results=/x/R.md", "--seeds", "0"]) == \
        "python reproduce.py flip --seeds 0"


def test_results_quotes_the_rule():
    """RESULTS.md's 'Verdict rule' paragraph is the docstring of reproduce.verdict, word for word, outside any
    generated block."""
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), encoding="utf-8").read()
    quote = re.search(r"\*\*Verdict rule\.\*\*.*?\n\n((?:> .*\n)+)", text)
    assert quote and " ".join(ln[2:] for ln in quote.group(1).splitlines()) == reproduce.VERDICT_RULE
    before = text[:quote.start()]
    assert len(re.findall(r"<!-- reproduce:\w+ -->", before)) == len(re.findall(r"<!-- /reproduce:\w+ -->", before))
