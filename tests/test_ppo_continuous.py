"""ppo_continuous.py and ppo_gsde.py: the normalisation statistics against NumPy's and in the checkpoint, gSDE's
noise (tests/test_family.py runs them, with ppo_mpi.py on one rank)."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_continuous
from tests.conftest import only_run_dir, run_in_process


def test_normalisation_statistics_are_numpys():
    """Normalize's observation statistics are the mean and variance of every raw observation; its return statistics
    those of each env's discounted return at every real step (the reset steps of next-step autoreset left out)."""
    raw, raw_rewards = [], []
    episodes = ppo_continuous.make_envs("Pendulum-v1", 2)
    recorded = gym.wrappers.vector.TransformObservation(episodes, lambda obs: raw.append(obs.copy()) or obs)
    recorded = gym.wrappers.vector.TransformReward(recorded, lambda reward: raw_rewards.append(reward) or reward)
    obs_rms, return_rms = ppo_continuous.RunningMeanStd(shape=(3,)), ppo_continuous.RunningMeanStd(shape=())
    envs = ppo_continuous.Normalize(recorded, obs_rms, return_rms, gamma=0.9)
    envs.reset(seed=0)
    returns, discounted, reset_next = [], np.zeros(2), np.zeros(2, bool)
    for _ in range(450):  # Pendulum truncates at 200 steps: two episodes and their reset steps in each env
        obs, _, terminated, truncated, _ = envs.step(np.random.uniform(-3, 3, (2, 1)))  # clipped to +-2
        assert np.abs(obs).max() <= 10
        discounted = discounted * 0.9 + raw_rewards[-1]
        returns += list(discounted[~reset_next])
        reset_next = terminated | truncated
        discounted[reset_next] = 0
    raw = np.concatenate(raw)
    np.testing.assert_allclose(obs_rms.mean, raw.mean(0), rtol=1e-6)
    np.testing.assert_allclose(obs_rms.var, raw.var(0), rtol=1e-5)
    assert obs_rms.count == pytest.approx(len(raw))
    assert return_rms.count == pytest.approx(len(returns)) and len(returns) == 2 * 448
    np.testing.assert_allclose(return_rms.var, np.var(returns), rtol=1e-3)


def test_the_statistics_travel_with_the_checkpoint(workdir):
    args = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2"]
    result = run_in_process("ppo_continuous.py", *args, "--total-timesteps", "512", "--eval-episodes", "0", cwd=workdir)
    assert result.returncode == 0, result.stderr
    checkpoint = only_run_dir(workdir) / "checkpoint.pt"
    obs_rms = torch.load(checkpoint, weights_only=True)["obs_rms"]
    assert obs_rms["count"].item() == pytest.approx(514) and obs_rms["mean"].shape == (3,)  # 512 steps and 2 resets
    # a resumed run goes on from them (and counts its envs' 2 resets)
    resume = ["--resume", str(checkpoint), "--total-timesteps", "768", "--eval-episodes", "0"]
    assert run_in_process("ppo_continuous.py", *args, *resume, cwd=workdir).returncode == 0
    assert torch.load(checkpoint, weights_only=True)["obs_rms"]["count"].item() == pytest.approx(514 + 258)


def test_evaluation_leaves_the_statistics_alone():
    obs_rms = ppo_continuous.RunningMeanStd(shape=(3,))
    obs_rms.update(np.random.default_rng(0).normal(size=(50, 3)))
    before = (obs_rms.mean.copy(), obs_rms.var.copy(), obs_rms.count)
    envs = ppo_continuous.make_envs("Pendulum-v1", 1)
    agent = ppo_continuous.Agent(ppo_continuous.Normalize(envs, obs_rms))
    ppo_continuous.evaluate(agent, "Pendulum-v1", 1, 0, obs_rms)
    np.testing.assert_array_equal(obs_rms.mean, before[0])
    np.testing.assert_array_equal(obs_rms.var, before[1])
    assert obs_rms.count == before[2]


def test_gsde_noise_is_kept_for_sde_sample_freq_steps():
    import ppo_gsde

    envs = ppo_gsde.make_envs("Pendulum-v1", 3)
    agent = ppo_gsde.Agent(envs, log_std_init=0.0)
    obs = torch.randn(3, 3)
    with torch.inference_mode():
        agent.sample_noise(3)
        first, second = agent.get_action_and_value(obs)[0], agent.get_action_and_value(obs)[0]
        agent.sample_noise(3)
        third = agent.get_action_and_value(obs)[0]
    torch.testing.assert_close(first, second)  # the same weights: the same action for the same state
    assert not torch.allclose(first, third)  # new weights, new noise
