"""Benchmark report: one markdown table per preset and one PNG of learning curves per task.

    python benchmark/report.py benchmark/results/quick

It reads what benchmark.sh leaves in a preset folder: TASK/SCRIPT/spec (task, script, env id, steps) and
TASK/SCRIPT/seedN/ holding `done` (wall seconds) or `failed`, log.txt and runs/*/events.out.tfevents.*. What it needs
of a finished run goes to seedN/summary.json (the day it finished and the machine, the final return, the greedy
evaluation, steps/s, the curve binned to at most 500 points): git keeps spec, done and summary.json (.gitignore), so a
fresh clone still reports and plots the runs of earlier sessions, and benchmark.sh skips them; a run's own events,
where present, always win.

The final return of a run is the mean episodic return over its last 10% of episodes (at least one); of a population
(ppo_pbt.py, a folder per member), its best member's, whose curve is the run's curve; a task's figure
for a script is the mean ± std (over seeds, population std) of those finals. Steps/s is the run's own `charts/SPS`
at its end (env steps over training wall time), averaged over seeds. The greedy evaluation after training
(`eval/episodic_return`, the mean over --eval-episodes episodes) is reported the same way: RL Zoo's published figures
are such evaluations of the final policy. The best of the mean curve is the highest point of the plotted curve (each
run's smoothed over 5% of its episodes, then averaged over seeds): Tianshou's published metric. The report goes to
PRESET/report.md, the plots beside it.
"""

import argparse
import csv
import json
import math
import os
import platform
import re
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

FINAL_FRACTION = 0.1
CURVE_POINTS = 500  # a stored curve: consecutive episodes averaged in this many bins, enough for a plot
PUBLISHED = Path(__file__).resolve().parent / "published.csv"
CPUINFO = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""  # Linux's; elsewhere platform's
CPU = re.search(r"^model name\s*:\s*(.+)$", CPUINFO, re.M)
MACHINE = f"{CPU.group(1) if CPU else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def read_scalars(run_dir: Path) -> dict:
    """{tag: [(step, value), ...]} over every TensorBoard event file under run_dir, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: keep every point, no sampling
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in scalars.items()}


def final_return(returns: list) -> float:
    tail = max(1, math.ceil(FINAL_FRACTION * len(returns)))
    return float(np.mean(returns[-tail:]))


def binned(curve: list, points: int = CURVE_POINTS) -> list:
    """The curve [(step, return), ...] as at most `points` bins of consecutive episodes: (last step, mean return)."""
    if len(curve) <= points:
        return [list(point) for point in curve]
    steps, values = np.array(curve, dtype=np.float64).T
    return [[steps[b[-1]], values[b].mean()] for b in np.array_split(np.arange(len(curve)), points)]


def summarise_events(seed_dir: Path) -> dict:
    """A finished run's summary from its TensorBoard events: final return (of the full curve), greedy evaluation,
    steps/s and the binned curve."""
    scalars = read_scalars(seed_dir)
    curve = scalars.get("charts/episodic_return", [])
    members = sorted(seed_dir.glob("runs/*/member*"))
    if members:  # a population (ppo_pbt.py): the run's curve is its member's with the best final return
        curves = [read_scalars(member).get("charts/episodic_return", []) for member in members]
        curve = max(curves, key=lambda c: final_return([v for _, v in c]) if c else -math.inf)
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime((seed_dir / "done").stat().st_mtime)),  # when it finished
        "machine": MACHINE,
        "final": final_return([v for _, v in curve]) if curve else None,
        "eval": scalars["eval/episodic_return"][-1][1] if "eval/episodic_return" in scalars else None,
        "sps": scalars["charts/SPS"][-1][1] if "charts/SPS" in scalars else None,
        "curve": binned(curve),
    }


def provenance(runs: list) -> str:
    """When and on what machine the finished runs were measured, as their summaries record it (a summary written
    before they did carries no machine)."""
    done = [run for run in runs if run["status"] == "done"]
    dates = sorted(run["date"] for run in done if run.get("date"))
    machines = Counter(run.get("machine", "a machine not recorded") for run in done)
    when = "" if not dates else f" {dates[0]}" if dates[0] == dates[-1] else f" {dates[0]} to {dates[-1]}"
    return f"Measured{when} on " + "; ".join(f"{machine} ({n} runs)" for machine, n in machines.items()) + "."


def load_runs(preset_dir: Path) -> list:
    """One dict per (task, script, seed): status (done, failed, missing), wall time, return curve, SPS."""
    runs = []
    for spec in sorted(preset_dir.glob("*/*/spec")):
        task, script, env_id, steps = spec.read_text().splitlines()[:4]
        for seed_dir in sorted(spec.parent.glob("seed*")):
            run = {"task": task, "script": script, "env_id": env_id, "steps": int(steps), "dir": seed_dir}
            run["status"] = (
                "done" if (seed_dir / "done").exists() else "failed" if (seed_dir / "failed").exists() else "missing"
            )
            if run["status"] == "done":
                stored = seed_dir / "summary.json"
                if any(seed_dir.rglob("events.out.tfevents.*")) or not stored.exists():
                    stored.write_text(json.dumps(summarise_events(seed_dir)) + "\n")
                run |= json.loads(stored.read_text())
                run["wall"] = float((seed_dir / "done").read_text())
                run["sps"] = float("nan") if run["sps"] is None else run["sps"]
                if not run["curve"]:
                    run["status"] = "no episodes"
            runs.append(run)
    return runs


def load_published(path: Path = PUBLISHED) -> dict:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    published: dict = {}
    for row in rows:
        published.setdefault(row["task"], []).append(row)
    return published


def mean_curve(runs: list) -> tuple:
    """The mean and std over runs (one script's seeds on one task) of their curves, each smoothed by a running mean
    over 5% of its points and read on a common grid of 100 steps; NaN where no run has reached a point yet."""
    grid = np.linspace(0, max(r["steps"] for r in runs), 100)
    smoothed = []
    for run in runs:
        steps, values = np.array(run["curve"], dtype=np.float64).T
        window = max(1, len(values) // 20)
        values = np.convolve(values, np.ones(window) / window, mode="valid")
        steps = steps[window - 1 :]
        smoothed.append(np.where((grid >= steps[0]) & (grid <= steps[-1]), np.interp(grid, steps, values), np.nan))
    with warnings.catch_warnings():  # grid points that no seed reaches stay empty (NaN): expected
        warnings.simplefilter("ignore", RuntimeWarning)
        return grid, np.nanmean(smoothed, axis=0), np.nanstd(smoothed, axis=0)


def summarise(runs: list) -> list:
    """One row per (task, script): counts, final return mean ± std over the finished seeds, SPS, wall time."""
    rows = []
    for key in dict.fromkeys((r["task"], r["script"]) for r in runs):
        group = [r for r in runs if (r["task"], r["script"]) == key]
        done = [r for r in group if r["status"] == "done"]
        finals = [r["final"] for r in done]
        evals = [r["eval"] for r in done if r["eval"] is not None]
        rows.append(
            {
                "task": key[0],
                "script": key[1],
                "steps": group[0]["steps"],
                "seeds": len(done),
                "problems": [f"{r['dir'].name} {r['status']} ({r['dir'] / 'log.txt'})" for r in group if r not in done],
                "mean": float(np.mean(finals)) if finals else float("nan"),
                "std": float(np.std(finals)) if finals else float("nan"),
                # Tianshou's metric: the highest point of the curve averaged over seeds
                "best": float(np.nanmax(mean_curve(done)[1])) if done else float("nan"),
                "eval": f"{np.mean(evals):.2f} ± {np.std(evals):.2f}" if len(evals) == len(done) and done else "-",
                "sps": float(np.mean([r["sps"] for r in done])) if done else float("nan"),
                "wall": float(np.mean([r["wall"] for r in done])) if done else float("nan"),
            }
        )
    return rows


def markdown(rows: list, published: dict, plots: dict) -> str:
    lines = [
        "| task | script | steps | seeds | final return (mean ± std) | greedy eval | best of mean curve | steps/s | "
        "wall time | published |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        refs = "; ".join(
            f"{p['mean']}{' ± ' + p['std'] if p['std'] else ''} ({p['source']}, {int(p['steps']):,} steps)"
            for p in published.get(row["task"], [])
        )
        result = f"{row['mean']:.2f} ± {row['std']:.2f}" if row["seeds"] else "no finished run"
        lines.append(
            f"| {row['task']} | {row['script']} | {row['steps']:,} | {row['seeds']} | {result} | {row['eval']} | "
            f"{row['best']:.2f} | "
            f"{row['sps']:,.0f} | {row['wall'] / 60:.1f} min | {refs or '-'} |"
        )
    problems = [f"- {row['task']}, {row['script']}: {p}" for row in rows for p in row["problems"]]
    if problems:
        lines += ["", "Runs that did not finish:", *problems]
    lines += ["", *(f"![{task}]({name})" for task, name in plots.items())]
    return "\n".join(lines) + "\n"


def plot_task(task: str, runs: list, published: list, path: Path) -> None:
    """Mean ± std band over seeds of each script's episodic return, on a common step grid, and the published lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for script in dict.fromkeys(r["script"] for r in runs):
        done = [r for r in runs if r["script"] == script and r["status"] == "done"]
        if not done:
            continue
        grid, mean, std = mean_curve(done)
        ax.plot(grid, mean, label=f"{script} ({len(done)} seeds)")
        ax.fill_between(grid, mean - std, mean + std, alpha=0.25)
    for i, ref in enumerate(published):
        ax.axhline(
            float(ref["mean"]),
            color=f"C{i + 3}",
            linestyle="--",
            linewidth=1,
            label=f"{ref['source']} at {int(ref['steps']):,}",
        )
    ax.set(title=task, xlabel="environment steps", ylabel="episodic return")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset_dir", type=Path, help="a preset folder written by benchmark.sh")
    preset_dir = parser.parse_args().preset_dir
    if not preset_dir.is_dir():
        parser.exit(2, f"error: {preset_dir} is not a folder written by benchmark.sh\n")
    runs, published = load_runs(preset_dir), load_published()
    if not runs:
        parser.exit(2, f"error: {preset_dir} holds no runs (TASK/SCRIPT/spec files)\n")
    plots = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        plots[task] = f"{task.replace(' ', '_')}.png"
        plot_task(task, [r for r in runs if r["task"] == task], published.get(task, []), preset_dir / plots[task])
    report = markdown(summarise(runs), published, plots)
    report = f"{provenance(runs)}\n\n{report}"
    (preset_dir / "report.md").write_text(f"# Benchmark: {preset_dir.name}\n\n{report}")
    print(report)


if __name__ == "__main__":
    main()
