"""ppo_atari.py (and ppo_atari_mpi.py on one rank, in this process): whole-game statistics, the script as a user runs
it, the first minibatch's ratio. Learning Breakout takes hours: benchmark/results/atari has the curves."""

import numpy as np
import pytest
import torch

import ppo_atari
from tests.conftest import edited_copy, only_run_dir, read_scalars, run_in_process

SMALL = ["--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "1"]


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
def test_train_log_checkpoint_eval_resume(workdir, script):
    result = run_in_process(script, "--total-timesteps", "128", "--eval-episodes", "1", *SMALL, cwd=workdir)
    assert result.returncode == 0 and "over 1 greedy episodes" in result.stdout, result.stderr
    run_dir = only_run_dir(workdir)
    assert [step for step, _ in read_scalars(run_dir)["charts/SPS"]] == [64, 128]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["script"] == script and ckpt["global_step"] == 128 and ckpt["args"]["env_id"] == "Breakout-v5"

    result = run_in_process(script, "--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "192",
                            "--eval-episodes", "0", *SMALL, cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"] == 192
    lrs = [lr for _, lr in read_scalars(run_dir)["charts/learning_rate"]]
    np.testing.assert_allclose(lrs[-1], 2.5e-4 / 3, rtol=1e-5)  # iteration 3 of 3


def test_a_random_network_is_caught_by_the_first_minibatch_ratio(workdir):
    dropout = ("            nn.Flatten(),\n", "            nn.Flatten(), nn.Dropout(0.5),\n")
    module = edited_copy("ppo_atari.py", [dropout], workdir)
    result = run_in_process(module, "--total-timesteps", "64", *SMALL, cwd=workdir)
    assert result.returncode == 1 and "first minibatch's ratio is not 1" in result.stderr, result.stderr
