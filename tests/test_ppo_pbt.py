"""ppo_pbt.py: the population's draw, the perturbation and the selection by hand; the exchange of a member's state on
3 ranks (tests/ppo_pbt_ranks.py); then the script as a user runs it: a population of 2 on 2 ranks learns CartPole,
logs its hyperparameters and lineage and leaves the fittest member's checkpoint; errors end every rank."""

import csv
import math

import numpy as np
import pytest
import torch

import ppo_pbt as pb
from tests.conftest import REPO, mpirun, only_run_dir, read_scalars, run_in_process

FLOATS = ("learning_rate", "ent_coef", "clip_coef", "gae_lambda")


def test_the_initial_population_takes_every_stratum_of_every_range_once():
    args = pb.Args(learning_rate=(1e-5, 1e-2), update_epochs=(1, 8), clip_coef=(0.1, 0.3))
    population = pb.initial_population(args, 4, np.random.default_rng(0))
    # log-spaced centres of 4 strata for the learning rate, linear ones for the others
    assert sorted(m["learning_rate"] for m in population) == pytest.approx(
        [10 ** (-5 + 3 * (k + 0.5) / 4) for k in range(4)]
    )
    assert sorted(m["clip_coef"] for m in population) == pytest.approx([0.125, 0.175, 0.225, 0.275])
    assert sorted(m["update_epochs"] for m in population) == [2, 4, 5, 7]  # 1.875, 3.625, 5.375, 7.125 rounded
    assert all(type(m["update_epochs"]) is int and all(type(m[f]) is float for f in FLOATS) for m in population)
    # the strata of each range are dealt in their own order: not every range sorted alike
    orders = {tuple(np.argsort([m[flag] for m in population])) for flag in ("learning_rate", "clip_coef", "gae_lambda")}
    assert len(orders) > 1
    # a population of one sits at each range's centre (the learning rate's geometric one)
    (single,) = pb.initial_population(pb.Args(), 1, np.random.default_rng(0))
    assert single["learning_rate"] == pytest.approx(math.sqrt(1e-4 * 1e-3)) and single["clip_coef"] == pytest.approx(
        0.2
    )


def test_perturbation_stays_in_bounds_and_moves():
    args = pb.Args(learning_rate=(1e-5, 1e-2), update_epochs=(1, 8), ent_coef=(0.0, 0.02), gae_lambda=(0.9, 0.99))
    rng = np.random.default_rng(0)
    moved = 0
    for trial in range(2000):
        # start anywhere in the ranges, the ends included
        start = pb.initial_population(args, 1 + trial % 7, rng)[trial % (1 + trial % 7)]
        if trial % 5 == 0:
            start = {flag: getattr(args, flag)[trial % 2] for flag in pb.EVOLVED}
        new = pb.perturb(start, args, rng)
        for flag, value in new.items():
            low, high = getattr(args, flag)
            assert low <= value <= high, (flag, start[flag], value)
            assert type(value) is type(start[flag]), flag  # plain Python numbers: the checkpoint's args hold them
        moved += new["update_epochs"] != start["update_epochs"]
    assert moved > 1000  # a number of epochs moves by one at least, unless a range's end holds it
    # without resampling, a float is its value times 0.8 or 1.2, clipped to the range
    new = pb.perturb({**start, "clip_coef": 0.2}, pb.Args(resample_probability=0.0), rng)
    assert new["clip_coef"] in (pytest.approx(0.16), pytest.approx(0.24))


def test_the_least_fit_copy_the_winner_of_a_tournament_among_the_others():
    rng, args = np.random.default_rng(0), pb.Args(copy_threshold=0.0)
    spread = np.array([-1.0, 0.0, 1.0])  # returns around a mean: mean m, standard error 1 / sqrt(3)
    # member 1 finished one episode: it sits out; member 2 is the least fit
    returns = [list(5 + spread), [100.0], list(1 + spread), list(3 + spread)]
    for _ in range(20):
        plan = pb.select(returns, args, rng)
        assert list(plan) == [2] and plan[2] in (0, 3)
    assert pb.select(returns, pb.Args(tournament_size=3, copy_threshold=0.0), rng) == {2: 0}  # the fittest wins all
    assert pb.select([[1.0, 1.0], [2.0, 2.0]], args, rng) == {0: 1}  # a population of 2: one copy at least
    eight = [list(m + spread) for m in (4, 3, 2, 1, 0, 5, 6, 7)]
    assert pb.select(eight, pb.Args(truncation=0.5, tournament_size=1, copy_threshold=0.0), rng).keys() == {1, 2, 3, 4}
    assert pb.select([[], [1.0, 2.0]], args, rng) == {}  # nobody to compare with
    # Welch's t: means 1 apart over a standard error of sqrt(2/3) (t = 1.22): copied at a threshold of 1, not of 1.96
    pair = [list(1 + spread), list(2 + spread)]
    assert pb.select(pair, pb.Args(copy_threshold=1.0), rng) == {0: 1}
    assert pb.select(pair, pb.Args(copy_threshold=1.96), rng) == {}


def test_exchange_copies_weights_and_optimizer_exactly_on_three_ranks(workdir):
    result = mpirun(3, str(REPO / "tests" / "ppo_pbt_ranks.py"), cwd=workdir, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_an_error_stops_every_rank(workdir):
    result = mpirun(2, str(REPO / "ppo_pbt.py"), "--truncation", "2", cwd=workdir, timeout=60)
    assert result.returncode == 2 and result.stderr.count("error: --truncation 2.0") == 1, result.stderr
    # rank 1's envs raise after 300 steps, during training: rank 0 would wait for it at the next evolution for ever
    result = mpirun(
        2, str(REPO / "ppo_pbt.py"), "--env-id", "tests.mpi_ranks:CrashOnRank1-v0", "--total-timesteps", "100000",
        cwd=workdir, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "CrashOnRank1: the env broke on rank 1" in result.stderr, result.stderr


# Calibration: a population of 2 (default ranges), 50k steps each, evolving every 5 iterations, seeds 1-6: the fittest
# member's final fitness (mean return of its episodes since the last evolution) 372, 442, 500, 374, 500, 463; the
# threshold sits far below the worst seed and far above an untrained policy (~22).
LEARNING_STEPS, LEARNING_THRESHOLD = 50_000, 120


def test_a_population_of_two_learns_cartpole_on_two_ranks(workdir):
    result = mpirun(
        2, str(REPO / "ppo_pbt.py"), "--total-timesteps", str(LEARNING_STEPS), "--evolve-interval", "5",
        "--eval-episodes", "3", "--seed", "1", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "the fittest member" in result.stdout and "over 3 greedy episodes" in result.stdout, result.stdout
    run_dir = only_run_dir(workdir)
    rows = list(csv.DictReader(open(run_dir / "population.csv")))
    iterations = LEARNING_STEPS // 512
    assert len(rows) == 2 * (iterations // 5 + 2)  # the start, every evolution and the end, both members
    assert [row["fitness"] for row in rows[:2]] == ["nan", "nan"]
    evolutions = [rows[i : i + 2] for i in range(2, len(rows) - 2, 2)]
    # a copy, where one is made, goes from the fitter member to the less fit; over the run one is made at least
    copies = 0
    for pair in evolutions:
        fitness = [float(row["fitness"]) for row in pair]
        for member, row in enumerate(pair):
            if int(row["parent"]) != member:
                assert fitness[int(row["parent"])] > fitness[member], pair
                copies += 1
    assert copies >= 1
    for row in rows:
        for flag in pb.EVOLVED:
            low, high = getattr(pb.Args(), flag)
            assert low <= float(row[flag]) <= high
    # each member's curves, in its own folder; the fittest's final fitness is the population's result
    for member in (0, 1):
        assert {"charts/episodic_return", "losses/approx_kl"} <= read_scalars(run_dir / f"member{member}").keys()
    final = [float(row["fitness"]) for row in rows[-2:]]
    assert max(final) >= LEARNING_THRESHOLD, final
    # the checkpoint is the fittest member's, with its own hyperparameters; it evaluates on one rank
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    fittest = int(np.argmax(final))
    assert checkpoint["args"]["learning_rate"] == pytest.approx(float(rows[-2 + fittest]["learning_rate"]), rel=1e-5)
    result = run_in_process(
        "ppo_pbt.py", "--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--eval-episodes", "2", cwd=workdir
    )
    assert result.returncode == 0 and "over 2 greedy episodes" in result.stdout, result.stderr
    # --resume grows a population (here of one) from it: the steps go on, in the same folder
    steps = str(LEARNING_STEPS + 1024)
    result = run_in_process(
        "ppo_pbt.py", "--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", steps, "--eval-episodes", "0",
        cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"] == (LEARNING_STEPS // 512 + 2) * 512
    rows = list(csv.DictReader(open(run_dir / "population.csv")))
    assert rows[-1]["global_step"] == str((LEARNING_STEPS // 512 + 2) * 512) and rows[0]["global_step"] == "0"
