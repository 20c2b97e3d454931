"""benchmark.sh and benchmark/report.py: dry runs of every preset, the report on synthetic runs, a real tiny run."""

import importlib.util
import shutil
import subprocess

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("report", REPO / "benchmark" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

PRESETS = ["quick", "classic", "mujoco", "atari", "recurrent", "masking", "mpi"]


def bench(*args, cwd):
    return subprocess.run(
        ["bash", str(REPO / "benchmark.sh"), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_prints_every_command(tmp_path, preset):
    result = bench(
        "--preset", preset, "--seeds", "2", "--out", str(tmp_path / "out"), "--dry-run", "--", "--track", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and len(lines) % 2 == 0  # every spec, for seeds 1 and 2
    assert all("--seed 1 " in line for line in lines[0::2]) and all("--seed 2 " in line for line in lines[1::2])
    assert all(line.endswith("--track)") for line in lines)  # extra flags reach every script
    assert not (tmp_path / "out").exists()  # a dry run starts nothing


def test_tasks_and_only_select_matching_runs(tmp_path):
    result = bench("--preset", "mujoco", "--tasks", "Hopper|Walker", "--seeds", "1", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    env_ids = [line.split("--env-id ")[1].split()[0] for line in result.stdout.splitlines()]
    assert env_ids == ["Hopper-v4", "Walker2d-v4"] * 3  # CleanRL's settings, the tuned ones, gSDE tuned
    result = bench("--preset", "mujoco", "--only", "Hopper.*gsde.py tuned$", "--seeds", "2", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(
        "ppo_gsde.py --env-id Hopper-v4" in line and "--recompute-adv" in line for line in lines
    )


def test_bad_options_exit_2(tmp_path):
    for args in ([], ["--preset", "fast"], ["--preset", "quick", "--seeds", "0"]):
        assert bench(*args, cwd=tmp_path).returncode == 2


def write_run(seed_dir, returns, sps=1000.0, wall=60, eval_return=None):
    run_dir = seed_dir / "runs" / "run"
    writer = SummaryWriter(str(run_dir))
    for i, value in enumerate(returns):
        writer.add_scalar("charts/episodic_return", value, (i + 1) * 100)
    writer.add_scalar("charts/SPS", sps, len(returns) * 100)
    if eval_return is not None:
        writer.add_scalar("eval/episodic_return", eval_return, len(returns) * 100)
    writer.close()
    (seed_dir / "done").write_text(str(wall))


def make_preset(root):
    """Task CartPole-v1: ppo.py with 2 finished seeds, 1 failed, 1 missing; a second script with 1 finished seed."""
    script_dir = root / "CartPole-v1" / "ppo.py"
    script_dir.mkdir(parents=True)
    (script_dir / "spec").write_text("CartPole-v1\nppo.py\nCartPole-v1\n2000\n")
    # 20 episodes: the final 10% are the last two, so the finals are 10 and 30
    write_run(script_dir / "seed1", [0.0] * 18 + [10.0, 10.0], sps=1000, wall=60, eval_return=100.0)
    write_run(script_dir / "seed2", [0.0] * 18 + [20.0, 40.0], sps=3000, wall=180, eval_return=200.0)
    (script_dir / "seed3").mkdir()
    (script_dir / "seed3" / "failed").touch()
    (script_dir / "seed4").mkdir()  # started, never finished
    other = root / "CartPole-v1" / "ppo_x.py"
    other.mkdir()
    (other / "spec").write_text("CartPole-v1\nppo_x.py\nCartPole-v1\n2000\n")
    write_run(other / "seed1", [5.0] * 5)


def test_report_on_synthetic_runs(tmp_path):
    make_preset(tmp_path)
    rows = report.summarise(report.load_runs(tmp_path))
    ppo_row = next(r for r in rows if r["script"] == "ppo.py")
    assert ppo_row["seeds"] == 2
    assert ppo_row["mean"] == pytest.approx(20.0) and ppo_row["std"] == pytest.approx(10.0)
    assert ppo_row["sps"] == pytest.approx(2000.0) and ppo_row["wall"] == pytest.approx(120.0)
    # the highest point of the seeds' mean curve: the last episode, seed 1's 10 and seed 2's 40 (a window of 1)
    assert ppo_row["best"] == pytest.approx(25.0)
    assert [p.split()[:2] for p in ppo_row["problems"]] == [["seed3", "failed"], ["seed4", "missing"]]

    command = [str(REPO / ".venv/bin/python"), str(REPO / "benchmark/report.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "report.md").read_text()
    row = (
        "| CartPole-v1 | ppo.py | 2,000 | 2 | 20.00 ± 10.00 | 150.00 ± 50.00 | 25.00 | 2,000 | 2.0 min | 490.04 ± 6.12"
    )
    assert row in text
    assert "| CartPole-v1 | ppo_x.py | 2,000 | 1 | 5.00 ± 0.00 | - | 5.00 |" in text  # no evaluation logged
    assert str(tmp_path / "CartPole-v1" / "ppo.py" / "seed3" / "log.txt") in text  # the failed run's log
    assert (tmp_path / "CartPole-v1.png").stat().st_size > 5000

    # what git keeps of a run (spec, done, summary.json) reports the same rows without its events and logs
    for events in tmp_path.rglob("runs"):
        shutil.rmtree(events)
    assert report.summarise(report.load_runs(tmp_path)) == rows


def test_a_stored_curve_is_binned_and_keeps_the_final_return(tmp_path):
    seed_dir = tmp_path / "CartPole-v1" / "ppo.py" / "seed1"
    seed_dir.parent.mkdir(parents=True)
    (seed_dir.parent / "spec").write_text("CartPole-v1\nppo.py\nCartPole-v1\n200000\n")
    returns = [float(i) for i in range(2000)]
    write_run(seed_dir, returns)
    (run,) = report.load_runs(tmp_path)
    assert len(run["curve"]) == report.CURVE_POINTS and run["curve"][-1] == [200000, np.mean(returns[-4:])]
    assert run["final"] == pytest.approx(np.mean(returns[-200:]))  # the last 10% of all 2000 episodes


def test_tiny_real_benchmark_reports_failures_and_skips_finished_runs(tmp_path):
    out, tiny = tmp_path / "out", ["--", "--total-timesteps", "1024"]
    # the classic preset cut to 1024 steps a run, by a flag passed through to every script
    ok = bench("--preset", "classic", "--seeds", "1", "--out", str(out), *tiny, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("start:") == 3 and (out / "classic" / "report.md").exists()
    again = bench("--preset", "classic", "--seeds", "1", "--out", str(out), *tiny, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("done already:") == 3 and "start:" not in again.stdout
    bad = bench("--preset", "classic", "--seeds", "2", "--out", str(out), *tiny, "--num-minibatches", "3", cwd=tmp_path)
    assert bad.returncode == 1  # seed 2's runs fail (seed 1's are done and skipped); the exit status says so
    assert bad.stderr.count("FAILED (exit") == 3 and "3 run(s) failed" in bad.stderr and "log.txt" in bad.stderr
    assert "does not divide" in (out / "classic" / "CartPole-v1" / "ppo.py" / "seed2" / "log.txt").read_text()
