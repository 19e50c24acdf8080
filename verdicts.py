"""
The verdict rule of reproduce.py's studies, and the numbers behind it: exact counts from evaluate.py's metrics,
Δ paired by seed, the metric's sampling floor at N images, the paired t-test, its power and minimum detectable
effect, the positive control's threshold, and the markdown of a verdict table. The rule itself is verdict()'s
docstring (VERDICT_RULE, quoted in RESULTS.md).

Library file: imports only scipy; reproduce.py and harness.py import it.
"""
import fractions
import math
import sys

from scipy import stats

# test level and power, the sampling floor

ALPHA, POWER = 0.05, 0.80  # two-sided level of the paired t-test; power that sizes the seeds and the MDE
MIN_IMAGES = 2  # a difference of fewer images than this never counts, whatever its standard error says
# positive control: the capability clears its floor by POS_Z standard errors of one run's measurement and by a
# practical margin: the floor itself (a distance) or POS_FRACTION of the way from chance to always right (an accuracy)
POS_Z, POS_FRACTION = 3.0, 0.25
# accuracies evaluate.py writes as float32 fractions, and the key of the number of images each is over
COUNTS = {"judge_acc": "judge_n", "caption_shape": "caption_n", "caption_side": "caption_n",
          "caption_colour": "caption_n"}
CAPTION_PARTS = ("shape", "side", "colour")


# ----------------------------------------------------------------------------- exact metrics and the verdict rule
def fmt(vals, digits=3):
    """Mean over seeds, '± sd' with two or more seeds; '—' when missing."""
    vals = [v for v in (vals or []) if finite(v)]
    if not vals:
        return "—"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def mean(vals):
    """Mean of the finite values (nan when there are none)."""
    vals = [v for v in (vals or []) if finite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def finite(v):
    """A number that is neither nan nor infinite (bool and None are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def related(metric, suffix):
    """The key of a metric's companion value: ('judge_acc@200', 'k') -> 'judge_acc_k@200'."""
    base, at, step = metric.partition("@")
    return f"{base}_{suffix}{at}{step}"


def exact(m, path="metrics"):
    """An evaluate.py metrics dict with every accuracy as an exact count, in float64: <key>_k of <key>_n images agree
    and <key> = k / n. evaluate.py writes float32 fractions, so k = round(acc · n), checked to be a count to within
    float32 rounding (else a one-line error naming the file). caption_mean becomes the three parts' counts over 3n
    (<key>_d is each value's denominator) and caption_mean_chance their mean chance; judge_acc_chance = 1/classes.
    _path records the file."""
    m = {**m, "_path": path}
    for key, nkey in COUNTS.items():
        acc, n = m.get(key), m.get(nkey)
        if not (finite(acc) and isinstance(n, int) and n > 0):
            continue
        k = round(acc * n)
        if not 0 <= k <= n or abs(acc * n - k) > n * 2.0 ** -23:  # float32 of k/n is within 2^-24 of it
            sys.exit(f"reproduce.py: {path}: {key} = {acc!r} over {nkey} = {n} images is not a count of images")
        m.update({key: k / n, f"{key}_k": k, f"{key}_n": n, f"{key}_d": n})
    parts = [f"caption_{p}" for p in CAPTION_PARTS]
    if all(f"{p}_k" in m for p in parts) and len({m[f"{p}_n"] for p in parts}) == 1:
        n, k = m["caption_side_n"], sum(m[f"{p}_k"] for p in parts)
        m.update(caption_mean=k / (3 * n), caption_mean_k=k, caption_mean_n=n, caption_mean_d=3 * n)
        if all(finite(m.get(f"{p}_chance")) for p in parts):
            m["caption_mean_chance"] = sum(m[f"{p}_chance"] for p in parts) / len(parts)
    if finite(m.get("judge_chance")):
        m["judge_acc_chance"] = m["judge_chance"]
    return m


def paired_deltas(b, t, metric):
    """treatment − baseline per seed (None where either is missing), from the exact counts where both rows have
    them (the exact difference, rounded once to float64), else from the values."""
    out = []
    for i, (bv, tv) in enumerate(zip(b.get(metric) or [], t.get(metric) or [])):
        cnt = [(r.get(related(metric, "k")) or [None] * (i + 1))[i] for r in (b, t)]
        den = [(r.get(related(metric, "d")) or [None] * (i + 1))[i] for r in (b, t)]
        if all(isinstance(x, int) for x in cnt + den):
            out.append(float(fractions.Fraction(cnt[1], den[1]) - fractions.Fraction(cnt[0], den[0])))
        else:
            out.append(tv - bv if finite(bv) and finite(tv) else None)
    return out


def sampling_floor(b, t, metric):
    """The smallest treatment − baseline the metric resolves at its N, from the rows' per-seed numbers: for an
    accuracy, the binomial standard error of a difference of two proportions, sqrt(p_b(1 − p_b)/N_b +
    p_t(1 − p_t)/N_t) (p: mean over seeds; N: images of one evaluation), and at least MIN_IMAGES images; for a mean
    over P prompts (the size distance), its standard error sqrt(sd_b²/P_b + sd_t²/P_t) (sd over prompts,
    root-mean-square over seeds). nan where the rows lack what it needs."""
    def part(r):
        vals, n = r.get(metric) or [], [v for v in (r.get(related(metric, "n")) or []) if finite(v)]
        if n:
            p = mean(vals)
            return p * (1 - p) / min(n), min(n)
        sd, prompts = r.get(related(metric, "sd")) or [], r.get(related(metric, "prompts")) or []
        var = [s * s / k for s, k in zip(sd, prompts) if finite(s) and finite(k) and k > 0]
        return (mean(var), None) if var else (float("nan"), None)
    (vb, nb), (vt, nt) = part(b), part(t)
    se = math.sqrt(vb + vt) if finite(vb + vt) else float("nan")
    return max(se, MIN_IMAGES / min(nb, nt)) if nb and nt and finite(se) else se


def power(n, effect, sd, alpha=ALPHA):
    """Power of the two-sided paired t-test at level alpha over n seeds to detect a mean Δ of `effect` when Δ has
    standard deviation sd across seeds (noncentral t with n − 1 degrees of freedom)."""
    if n < 2:
        return 0.0
    if sd == 0:
        return 1.0 if effect else alpha
    df, nc = n - 1, abs(effect) * math.sqrt(n) / sd
    tc = stats.t.ppf(1 - alpha / 2, df)
    lower = stats.nct.cdf(-tc, df, nc)  # the far tail: below 1e-9 where scipy's series gives nan
    return float(stats.nct.sf(tc, df, nc) + (lower if lower == lower else 0.0))


def seeds_for_power(pilot, effect, target=POWER, alpha=ALPHA, most=100):
    """The fewest seeds (>= 2) whose paired t-test detects a mean Δ of `effect` with `target` power, sd(Δ) taken
    from a pilot's per-seed Δ (ddof 1); None when even `most` seeds cannot."""
    d = [float(v) for v in pilot if finite(v)]
    if len(d) < 2:
        return None
    m = sum(d) / len(d)
    sd = math.sqrt(sum((v - m) ** 2 for v in d) / (len(d) - 1))
    return next((n for n in range(2, most + 1) if power(n, effect, sd, alpha) >= target), None)


def mde(n, sd, target=POWER, alpha=ALPHA):
    """Minimum detectable effect of the paired t-test over n seeds with sd(Δ) = sd: the mean Δ it detects with
    `target` power (inf below two seeds)."""
    if n < 2 or not finite(sd):
        return float("inf")
    if sd == 0:
        return 0.0
    hi = sd
    while power(n, hi, sd, alpha) < target:
        hi *= 2
    lo = 0.0
    for _ in range(60):  # bisection: power rises with the effect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power(n, mid, sd, alpha) < target else (lo, mid)
    return hi


def claim_stats(deltas, floor, confirm=None):
    """The numbers behind a verdict: the paired t-test of the design seeds' Δ (n, mean, sd, t, p), the floor, the
    design-stage decision (the sign of mean Δ where p < ALPHA and |mean Δ| > floor, else 0), the MDE, the seeds
    sd(Δ) needs for POWER at the floor, and the confirmation seeds' mean Δ and whether it holds."""
    d = [float(v) for v in deltas if finite(v)]
    n = len(d)
    m = sum(d) / n if n else float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1)) if n > 1 else float("nan")
    if n < 2:
        t, p = float("nan"), 1.0
    elif sd <= 1e-9 * abs(m) or sd == 0:  # every seed moved by the same amount (up to float rounding): no spread
        # to doubt it (p 0), or no move at all (p 1)
        t, p = (math.copysign(float("inf"), m), 0.0) if m else (0.0, 1.0)
    else:
        r = stats.ttest_1samp(d, 0.0)
        t, p = float(r.statistic), float(r.pvalue)
    decision = int(math.copysign(1, m)) if p < ALPHA and finite(floor) and abs(m) > floor else 0
    c = [float(v) for v in (confirm or []) if finite(v)]
    cm = sum(c) / len(c) if c else float("nan")
    holds = bool(c) and decision != 0 and math.copysign(1, cm) == decision and abs(cm) > floor
    need = seeds_for_power(d, floor) if finite(floor) and floor > 0 else None
    return dict(n=n, mean=m, sd=sd, t=t, p=p, floor=floor, decision=decision, mde=max(mde(n, sd), floor)
                if finite(floor) else float("inf"), seeds_needed=need, confirm_n=len(c), confirm_mean=cm,
                confirmed=holds)


def verdict(deltas, expected_sign, floor, confirm=None, absent=None):
    """The verdict rule. Δ = treatment − baseline per training seed, paired (both rows share the seed and the
    evaluation noise), in float64 from exact counts (an accuracy is k of N images). Seeds come in two sets fixed in
    advance: design seeds (three, or five where a pilot's sd(Δ) says three cannot detect the floor at 80 % power)
    and confirmation seeds (two more). (1) Positive control: the study first measures, in the same runs, the
    capability its claims act on, against its floor (a distance: its 8-bit floor, threshold floor + max(3 standard
    errors of one run, the floor); an accuracy: chance, threshold chance + max(3 standard errors, a quarter of the
    way from chance to 1)); if it fails, the verdict is 'inconclusive: <capability> absent'. A claim is gated by
    the control's rows among the two it compares (every control row when it compares none of them). (2) Floor: a Δ counts
    only if |mean Δ| exceeds the metric's own sampling error at N images, whatever the seeds say: for an accuracy
    the binomial standard error of a difference of two proportions, sqrt(p_b(1 − p_b)/N + p_t(1 − p_t)/N), and at
    least 2 images; for a mean over prompts its standard error. (3) Test: a two-sided paired t-test of mean Δ = 0
    over the design seeds at level 0.05 (not the exact sign-flip test: its smallest two-sided p is 2/2^n, 0.25 at
    three seeds and 0.0625 at five, so it can never reach 0.05). (4) Confirmation: on the confirmation seeds mean Δ
    has the same sign and clears the floor too. 'reproduced': (2)-(4) hold with the paper's sign; 'contradicted':
    they hold with the opposite sign; otherwise 'no effect', reported with the minimum detectable effect of the
    design: the larger of the floor and the mean Δ the t-test over the design seeds detects with 80 % power at the
    observed sd(Δ)."""
    if absent:
        return f"inconclusive: {absent} absent"
    s = claim_stats(deltas, floor, confirm)
    if not s["decision"] or not s["confirmed"]:
        return "no effect"
    return "reproduced" if (s["decision"] > 0) == (expected_sign > 0) else "contradicted"


VERDICTS = ("reproduced", "contradicted", "no effect", "inconclusive")
VERDICT_RULE = " ".join(verdict.__doc__.split())  # one paragraph; RESULTS.md's "Verdict rule" quotes it


def capability(kind, r, metric):
    """Part (1) of the rule on one row's per-seed numbers r ({key: [value per seed]}): the measured capability (mean
    over seeds) against threshold = floor + max(POS_Z · one run's standard error, margin); kind "distance": floor =
    the metric's 8-bit floor, margin = the floor itself; kind "chance": floor = chance, margin = POS_FRACTION ·
    (1 − chance). None when the row has no value of the metric."""
    vals = [v for v in r.get(metric, []) if finite(v)]
    if not vals:
        return None
    if kind == "distance":
        floor = mean(r.get(related(metric, "floor")))
        se = math.sqrt(mean([s * s / k for s, k in zip(r.get(related(metric, "sd"), []),
                                                       r.get(related(metric, "prompts"), [])) if finite(s)]))
        margin = floor
    else:
        floor = mean(r.get(related(metric, "chance")))
        n = min([k for k in r.get(related(metric, "n"), []) if finite(k)] or [float("nan")])
        se, margin = math.sqrt(floor * (1 - floor) / n), POS_FRACTION * (1 - floor)
    thr = floor + max(POS_Z * se, margin)
    return dict(values=vals, measured=mean(vals), floor=floor, threshold=thr, passed=finite(thr) and mean(vals) > thr)



def num(v, digits=4):
    """A number to `digits` decimals, '—' where it is not finite (one prompt has no standard error)."""
    return f"{v:.{digits}f}" if finite(v) else "—"


def signed(v, digits=3):
    """A signed number, '—' where missing."""
    return "—" if v is None or not finite(v) else f"{v:+.{digits}f}"


def claims_md(cl, a, ran_confirm):
    """The verdict table: one line per claim, the design seeds' test beside the confirmation seeds."""
    if not cl:
        return ""
    lines = ["", "| claim | decided by | treatment − baseline | Δ per design seed | mean Δ ± sd | p (paired t) | "
             "floor | confirmation Δ | MDE (80 %) | seeds for 80 % at the floor | paper's sign | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cl:
        s = c["stats"]
        if c["confirm"]:
            conf = (", ".join(signed(v) for v in c["confirm"]) + f" (mean {signed(s['confirm_mean'])}: " +
                    ("holds" if s["confirmed"] else "does not hold" if s["decision"] else "design not decisive")
                    + ")")
        else:
            conf = ("not run (no design-stage decision)" if a.confirm_seeds and not ran_confirm else
                    "none (--confirm-seeds empty)" if not a.confirm_seeds else "—")
        p = "—" if s["n"] < 2 else f"{s['p']:.3g}"
        need = s["seeds_needed"] or ("—" if s["n"] < 2 or not finite(s["floor"]) else "> 100")
        floor = f"{s['floor']:.4f}" if finite(s["floor"]) else "—"
        mde_ = f"{s['mde']:.4f}" if finite(s["mde"]) else "∞"
        lines.append(f"| {c['claim']} | {c['name']} | {c['treatment']} − {c['baseline']} | "
                     f"{', '.join(signed(v) for v in c['deltas']) or '—'} | {fmt(c['deltas'])} | {p} | {floor} | "
                     f"{conf} | {mde_} | {need} | {'+' if c['sign'] > 0 else '−'} | **{c['verdict']}** |")
    return "\n".join(lines)


def rule_note(a):
    """The block's one-line statement of the rule's parameters (the rule itself: RESULTS.md, 'Verdict rule')."""
    conf = " ".join(map(str, a.confirm_seeds)) or "none"
    return (f"verdict rule (reproduce.verdict): two-sided paired t-test over the design seeds "
            f"{' '.join(map(str, a.seeds))} at {ALPHA:g}, |mean Δ| beyond the metric's sampling floor at N (binomial "
            f"SE of a difference of proportions, ≥ {MIN_IMAGES} images; a distance's SE over prompts), the same sign "
            f"and floor on the confirmation seeds {conf}, a passed positive control; 'no effect' carries the MDE at "
            f"{POWER:.0%} power")
