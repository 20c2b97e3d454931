"""ppo_atari.py: whole-game statistics and flushed denormals (tests/test_family.py runs it). Learning Breakout takes
hours: benchmark/results/atari has the curves."""

import numpy as np
import pytest
import torch

import ppo_atari
from tests.conftest import only_run_dir, run_script
from tests.test_family import SMALL


def test_episode_statistics_are_whole_games():
    """A training episode ends at every lost life; info["episode"] reports each whole game: the sum of its unclipped
    rewards over all lives, and its steps without the reset steps that follow its lost lives."""
    envs = ppo_atari.make_envs("Breakout-v5", 2, seed=1)
    envs.reset()
    score, length, reset_next, games, lives_lost = np.zeros(2), np.zeros(2, int), np.zeros(2, bool), [], 0
    for _ in range(1500):
        _, reward, terminated, truncated, info = envs.step(np.random.randint(0, 4, 2))
        assert (reward[reset_next] == 0).all() and (np.abs(reward) <= 1).all()  # clipped for training
        score += info["reward"]
        length += ~reset_next
        lives_lost += (terminated & ~info["terminated"].astype(bool)).sum()
        if "episode" in info:
            for i in np.flatnonzero(info["_episode"]):
                games.append((info["episode"]["r"][i], info["episode"]["l"][i], score[i], length[i]))
                score[i], length[i] = 0, 0
        reset_next = terminated | truncated
    assert len(games) >= 4 and lives_lost >= 4 * len(games)  # Breakout's 5 lives: a game is several episodes
    assert all((reported, steps) == (real, real_steps) for reported, steps, real, real_steps in games), games
    assert envs.return_queue and list(envs.return_queue) == [r for r, *_ in games]


@pytest.mark.parametrize("script", ["ppo_atari.py", "ppo_atari_mpi.py"])
def test_adams_denormal_moments_are_flushed(workdir, script):
    """A moment of Adam's that its unit's zero gradients decay into float32's subnormal range stays there (0.9 times a
    few of its smallest steps rounds back), and CPUs compute such numbers slowly: the script flushes them to zero.
    Here the moments of the weights that had no gradient yet are set subnormal, and the run resumed for an iteration."""
    flags = ["--env-id", "Breakout-v5", *SMALL, "--eval-episodes", "0"]
    path, tiny = workdir / "checkpoint.pt", torch.finfo(torch.float32).tiny

    def subnormal_moments(checkpoint: dict) -> int:
        return sum(((s["exp_avg"] != 0) & (s["exp_avg"].abs() < tiny)).sum().item() for s in checkpoint.values())

    result = run_script(script, *flags, "--total-timesteps", "64", cwd=workdir)  # fresh processes, as a user's runs
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(only_run_dir(workdir) / "checkpoint.pt", weights_only=True)
    for state in checkpoint["optimizer"]["state"].values():
        state["exp_avg"][state["exp_avg_sq"] == 0] = tiny / 4
    assert subnormal_moments(checkpoint["optimizer"]["state"]) > 1000
    torch.save(checkpoint, path)
    result = run_script(script, *flags, "--total-timesteps", "128", "--resume", str(path), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert subnormal_moments(torch.load(path, weights_only=True)["optimizer"]["state"]) == 0
