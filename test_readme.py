"""Tests that read README.md and RESULTS.md: `.venv/bin/python -m pytest -q test_readme.py` (CPU, a minute). The
README's main job runs as written (train.py and sample.py, shortened); every train.py / sample.py / evaluate.py /
transfer.py / reproduce.py command of its bash blocks parses with that script's parser; every command asking for a
resampled PE grid names --pe-base; and every value of the full-scale section (the recipe and evaluation tables,
--grad-accum) and of RESULTS.md's memory plan (tables, constants, calibration, time per 100k steps) is what the code
computes."""
import os
import re
import shlex

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail at once, never retry

import torch  # noqa: E402

import bench  # noqa: E402
import evaluate  # noqa: E402
import reproduce  # noqa: E402
import run  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import transfer  # noqa: E402


def test_readme_commands(tmp_path, repo_dir, run_script):
    torch.manual_seed(0)
    text = open(os.path.join(repo_dir, "README.md")).read()
    blocks = re.findall(r"<!-- main-job -->(.*?)<!-- main-job -->", text, re.S)
    assert blocks, "README.md has no <!-- main-job --> block"
    cmds = [c.strip() for blk in blocks for line in blk.splitlines() for c in line.split("&&")
            if re.search(r"\b(train|sample)\.py\b", c)]
    assert any("train.py" in c for c in cmds) and any("sample.py" in c for c in cmds), cmds
    limits = {"train.py": ["--max-steps", "2", "--sample-steps", "2", "--no-progress"], "sample.py": ["--steps", "2"]}
    for c in cmds:  # run in a scratch dir: relative paths (out/ckpt.pt) resolve there, the scripts come from the repo
        words = shlex.split(c)
        i = next(i for i, w in enumerate(words) if w.endswith(("train.py", "sample.py")))
        script = os.path.basename(words[i])
        run_script([os.path.join(repo_dir, script), *words[i + 1:], *limits[script]], cwd=tmp_path)
    assert (tmp_path / "out" / "ckpt.pt").exists() and (tmp_path / "out" / "samples" / "grid.png").exists()


def test_readme_resample_names_pe_base(repo_dir):
    # without --pe-base a "resampled" grid spans the run's own grid, which equals extrapolation (pe_base defaults to
    # the run's own grid); every README command that asks for a resampled grid must name the pre-training grid
    text = open(os.path.join(repo_dir, "README.md")).read()
    spans = re.findall(r"`([^`\n]*--pe-grid resample[^`\n]*)`", text) + [
        ln for blk in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in blk.replace("\\\n", " ").splitlines()
        if "train.py" in ln and "--pe-grid resample" in ln]
    assert spans
    for s in spans:
        assert "--pe-base" in s, f"README: {s!r} lacks --pe-base"


def _readme_table(text, marker):
    """Rows (lists of cells, backticks dropped) of the markdown table between <!-- marker --> and <!-- /marker -->
    (in README.md or RESULTS.md)."""
    block = text.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
    lines = [ln for ln in block.strip().splitlines() if ln.startswith("|")][2:]
    return [[c.strip().strip("`") for c in ln.strip("|").split("|")] for ln in lines]


def test_readme_full_scale(tmp_path, repo_dir):
    """Every value the README's full-scale section states: the recipe table (each value passed explicitly to
    train.py changes nothing), the evaluation defaults and the --grad-accum values it names; and what it links to in
    RESULTS.md: the memory plan tables (8 and 16 cards) against bench.py --suite memory, the plan's constants, its
    calibration against the H200 benchmark, and the time per 100k steps."""
    readme = open(os.path.join(repo_dir, "README.md")).read()
    results = open(os.path.join(repo_dir, "RESULTS.md")).read()
    section = readme.split("## Full scale")[1].split("\n## ")[0]
    plan_md = results.split("## Memory plan for the paper's run")[1].split("\n## ")[0]
    plan_text = " ".join(plan_md.split())  # prose compared with line breaks as spaces
    assert "(RESULTS.md#memory-plan-for-the-papers-run)" in section and "(RESULTS.md#time-of-the-papers-run)" in section
    for res_col, res in ((2, "256"), (3, "512")):
        base = ["--size", "XL", "--resolution", res]
        for row in _readme_table(readme, "paper-run"):
            flag, vals = row[1], row[res_col].split()
            assert vars(train.parse_args(base + [flag, *vals])) == vars(train.parse_args(base)), \
                f"README: {flag} {row[res_col]} at {res} px is not what --size XL resolves to"
    ours_xl = {"recipe": "ours", "size": "XL"}
    spec = {256: dict(data=dict(resolution=256), model=dict(input_size=32, patch_size=2)),
            512: dict(data=dict(resolution=512, base_resolution=256), model=dict(input_size=64, patch_size=2))}
    truth = {"--beta": lambda r: run.default_beta(ours_xl)[0], "--lam": lambda r: run.default_lam(spec[r]),
             "--steps": lambda r: evaluate.EVAL_STEPS, "--num-samples": lambda r: evaluate.EVAL_SAMPLES}
    for row in _readme_table(readme, "paper-eval"):
        for col, res in ((2, 256), (3, 512)):
            assert float(row[col]) == truth[row[1]](res), f"README: {row[1]} {row[col]} at {res} px"
    for gpus, marker in ((8, "memory-plan"), (16, "memory-plan-16")):
        plan = bench.memory_plan(gpus=gpus)
        fmt = [[r["run"], r["card"].replace(" x ", " × "), f"{r['params_M']:.0f}", f"{r['fixed_GiB']:.2f}",
                f"{r['act_GiB_per_img']:.3f}", str(r["per_card_batch"]), str(r["micro_batch"]), str(r["grad_accum"]),
                f"{r['planned_GiB']:.1f}"] for r in plan]
        assert _readme_table(plan_md, marker) == fmt, f"RESULTS.md's {marker} != python bench.py --suite memory"
    accum = {(r["run"], r["card"].split(" x ")[1]): r["grad_accum"] for r in bench.memory_plan(gpus=8)}
    cmd = section.split("on 8 × A100-80GB")[1].split("```bash")[1].split("```")[0]
    assert f"--grad-accum {accum['ImageNet-1k 256 (class)', 'A100-80GB']} " in cmd and "--data latents" in cmd
    named = re.findall(r"8 × ([\w-]+): (\d+)", section)
    assert named and all(int(n) == accum["ImageNet-1k 256 (class)", card] for card, n in named), named
    assert f"{run.BYTES_PER_PARAM} bytes per parameter" in plan_text
    assert f"{100 * run.PLAN_FILL:.0f} % of the rest (of the card less {run.PLAN_RESERVE:.0f} GiB)" in plan_text
    # calibration: the plan's prediction for the H200 bench's eager mmDiT-XL/2 text step vs its measured peak
    row = re.search(r"\| mmDiT-XL/2 \(1\.33 B\) \| (\d+) \| no \|[^|]*\|[^|]*\|[^|]*\| ([\d.]+) \|", results)
    # (that bench ran SD3's full context stream, 1.33 B: the plan of the same network, --context-weights full)
    text_m = bench.measure_memory(bench.PLAN_RUNS["CC12M 256 (text)"] + ["--context-weights", "full"])
    assert f"predicted {bench.bench_peak_gib(text_m, int(row[1])):.1f} GiB, measured {row[2]}" in plan_text
    # time per 100k steps from the compiled mmDiT-XL/2 row's img/s
    ips = float(re.search(r"\| mmDiT-XL/2 \(1\.33 B\) \| \d+ \| yes \|[^|]*\|[^|]*\| ([\d.]+) \|", results)[1])
    h8 = 100_000 * 2048 / (8 * ips) / 3600
    assert f"≈ {h8:.0f} h per 100k steps at batch 2048 on 8 × H200 (≈ {h8 / 2:.1f} h on 16)" in plan_text
    assert f"({ips:.0f} img/s per card" in plan_text and f"≈ {6 * h8 / 24:.1f} days on 8" in plan_text


def _readme_torchrun_train(text):
    """(torchrun's arguments, train.py's flags) of every `torchrun ... train.py ...` command in the README's bash
    blocks, line continuations joined."""
    cmds = []
    for blk in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in blk.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0])
            if words[:1] == ["torchrun"] and "train.py" in words:
                i = words.index("train.py")
                cmds.append((words[1:i], words[i + 1:]))
    return cmds


def test_full_scale_commands_fit(repo_dir):
    """Every full-scale `torchrun ... train.py` command in the README fits the card it names (8 x A100-80GB, the
    paper's §4 nodes, where the section names none): its per-card micro-batch (global batch / cards / --grad-accum,
    or the plan's own choice under --grad-accum auto) within the memory plan's room on that card, by the same
    numbers as bench.py --suite memory (run.memory_per_card; ImageNet-1k's 1000 classes where the class count comes
    from the data at run time). --init-from is left out: the transferred file's
    settings are the flags transfer.py prints, which the command repeats."""
    readme = open(os.path.join(repo_dir, "README.md")).read()
    cmds = _readme_torchrun_train(readme)
    assert len(cmds) >= 3, cmds
    card = "A100-80GB"
    assert f"on 8 × {card}" in readme
    for tr, flags in cmds:
        opts = dict(zip(tr[::2], tr[1::2])) if all(w.startswith("--") for w in tr[::2]) else {}
        gpus = int(opts.get("--nproc_per_node", opts.get("--nproc-per-node", 1))) * int(opts.get("--nnodes", 1))
        if "--init-from" in flags:
            i = flags.index("--init-from")
            flags = flags[:i] + flags[i + 2:]
        if "latents" in flags:  # the shards' meta.json names VAE and size; the same run encoding on the fly plans
            flags[flags.index("latents")] = "imagefolder"  # the same network, with the VAE counted on the card
        cfg = bench.print_config(flags)
        if cfg["args"]["semantic"] == "class" and cfg["spec"]["semantic"]["num_classes"] is None:
            flags = flags + ["--num-classes", "1000"]  # the class count an ImageFolder root gives at run time
        m = bench.measure_memory(flags)
        per_card, accum = cfg["args"]["global_batch"] // gpus, cfg["args"]["grad_accum"]
        room = run.PLAN_FILL * (bench.CARDS[card] - run.PLAN_RESERVE) - m["fixed_gib"]
        if accum == "auto":
            assert run.plan_micro_batch(m, per_card, bench.CARDS[card]) is not None, (flags, m)
        else:
            assert per_card % accum == 0, (flags, per_card, accum)
            need = per_card // accum * m["act_gib"]
            assert need <= room, f"README: {' '.join(flags)} needs {need + m['fixed_gib']:.1f} GiB per {card}"


def test_readme_commands_parse(repo_dir):
    """Every train.py / sample.py / evaluate.py / transfer.py / reproduce.py command in the README's bash blocks
    parses with that script's own parser (a renamed or removed flag fails here, not in a user's shell)."""
    text = open(os.path.join(repo_dir, "README.md")).read()
    parsers = {"train.py": train.parse_args, "sample.py": sample.get_parser().parse_args,
               "evaluate.py": evaluate.get_parser().parse_args, "transfer.py": transfer.get_parser().parse_args,
               "reproduce.py": reproduce.get_parser().parse_args}
    seen = set()
    for blk in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in blk.replace("\\\n", " ").splitlines():
            for cmd in line.split("#")[0].split("&&"):
                words = shlex.split(cmd)
                i = next((i for i, w in enumerate(words) if os.path.basename(w) in parsers), None)
                if i is None:
                    continue
                script = os.path.basename(words[i])
                seen.add(script)
                try:
                    parsers[script](words[i + 1:])
                except SystemExit as e:
                    raise AssertionError(f"README: {cmd.strip()!r} does not parse ({e})") from None
    assert seen == set(parsers), seen
