"""Plot a ppo_pbt.py population over time: each member's fitness and every hyperparameter that varied, from the run's
population.csv, with a dot where a member copied another.

    python benchmark/plot_population.py runs/RUN                  # writes runs/RUN/population.png
    python benchmark/plot_population.py runs/RUN --out lr.png
"""

import argparse
import csv
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a ppo_pbt.py run folder (it holds population.csv)")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: RUN_DIR/population.png)")
    args = parser.parse_args()
    path = args.run_dir / "population.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file; pass the folder of a ppo_pbt.py run")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(path.open()))
    columns = [c for c in rows[0] if c not in ("global_step", "member", "parent")]
    columns = [c for c in columns if c == "fitness" or len({row[c] for row in rows}) > 1]  # what varied
    members = sorted({int(row["member"]) for row in rows})
    fig, axes = plt.subplots(len(columns), 1, figsize=(7, 2.2 * len(columns)), sharex=True, squeeze=False)
    for ax, column in zip(axes[:, 0], columns):
        for member in members:
            own = [row for row in rows if int(row["member"]) == member]
            steps, values = [int(row["global_step"]) for row in own], [float(row[column]) for row in own]
            # a fitness is that of the interval up to its step; hyperparameters hold from their step on
            (line,) = ax.step(steps, values, where="pre" if column == "fitness" else "post", label=f"member {member}")
            copies = [(s, v) for s, v, row in zip(steps, values, own) if int(row["parent"]) != member]
            if copies and column != "fitness":  # the values a copy took on, where it copied
                ax.plot(*zip(*copies), "o", color=line.get_color(), markersize=4)
        ax.set_ylabel(column.replace("_", " "))
        if column == "learning_rate":
            ax.set_yscale("log")
    axes[0, 0].legend(fontsize=7, ncol=min(4, len(members)))
    axes[-1, 0].set_xlabel("env steps of each member")
    fig.suptitle(f"{args.run_dir.name}: the population (dots: a member copied a fitter one)", fontsize=9)
    fig.tight_layout()
    out = args.out or args.run_dir / "population.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
