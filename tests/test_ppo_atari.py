"""ppo_atari.py: whole-game statistics (tests/test_family.py runs it). Learning Breakout takes hours:
benchmark/results/atari has the curves."""

import numpy as np

import ppo_atari


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
