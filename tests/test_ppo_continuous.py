"""ppo_continuous.py and its children (ppo_gsde.py; ppo_mpi.py on one rank): the normalisation statistics against
NumPy's, the script as a user runs it, the first minibatch's ratio, learning."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_continuous
from tests.conftest import edited_copy, only_run_dir, read_scalars, run_in_process

SCRIPTS = ["ppo_continuous.py", "ppo_gsde.py", "ppo_mpi.py"]
SMALL = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2"]
SMALL += ["--update-epochs", "2"]


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


@pytest.mark.parametrize("script", SCRIPTS)
def test_train_log_checkpoint_eval_resume(workdir, script):
    result = run_in_process(script, "--total-timesteps", "512", "--save-interval", "1", "--eval-episodes", "1", *SMALL,
                            cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    scalars = read_scalars(run_dir)
    assert {"charts/episodic_return", "losses/approx_kl", "losses/explained_variance"} <= set(scalars)
    assert [step for step, _ in scalars["charts/SPS"]] == [128, 256, 384, 512]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["script"] == script and ckpt["global_step"] == 512
    obs_count = ckpt["obs_rms"]["count"].item()  # the statistics travel with the checkpoint
    assert obs_count == pytest.approx(514) and ckpt["obs_rms"]["mean"].shape == (3,)  # 512 steps and 2 resets

    # evaluation: the statistics frozen (the checkpoint unchanged), the greedy policy plays
    result = run_in_process(script, "--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--eval-episodes", "1",
                            cwd=workdir)  # fmt: skip
    assert result.returncode == 0 and "over 1 greedy episodes" in result.stdout, result.stderr

    result = run_in_process(script, "--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "768",
                            "--eval-episodes", "0", *SMALL, cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert resumed["global_step"] == 768 and resumed["obs_rms"]["count"].item() == pytest.approx(
        obs_count + 258
    )  # and the resumed envs' 2 resets
    lrs = [lr for _, lr in read_scalars(run_dir)["charts/learning_rate"]]
    np.testing.assert_allclose(lrs[-2:], [3e-4 * (1 - 4 / 6), 3e-4 * (1 - 5 / 6)], rtol=1e-5)  # the schedule goes on


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


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_random_network_is_caught_by_the_first_minibatch_ratio(workdir, script):
    """Dropout makes the update compute another policy than the rollout sampled from: the ratio check stops the run
    (and a run that does not stop saw a ratio of 1 in every update's first minibatch)."""
    module = edited_copy(
        script, [("            Activation(),\n", "            Activation(), nn.Dropout(0.5),\n")], workdir
    )
    result = run_in_process(module, "--total-timesteps", "256", *SMALL, cwd=workdir)
    assert result.returncode == 1 and "first minibatch's ratio is not 1" in result.stderr, result.stderr


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


# Calibration (InvertedPendulum-v4, 25,600 steps of 512 x 1 env, minibatches of 64, mean return of the last 20
# episodes; an untrained policy scores under 10, the maximum is 1000), seeds 1-4: ppo_continuous.py 871, 881, 929, 905;
# ppo_gsde.py 744, 532, 791, 844.
LEARNING = ["--env-id", "InvertedPendulum-v4", "--num-steps", "512", "--num-minibatches", "8"]
LEARNING += ["--total-timesteps", "25600", "--eval-episodes", "0"]


@pytest.mark.parametrize("script, threshold", [("ppo_continuous.py", 500), ("ppo_gsde.py", 300)])
def test_learns_inverted_pendulum(workdir, script, threshold):
    result = run_in_process(script, *LEARNING, cwd=workdir)
    assert result.returncode == 0, result.stderr
    returns = [r for _, r in read_scalars(only_run_dir(workdir))["charts/episodic_return"]]
    assert np.mean(returns[-20:]) > threshold
