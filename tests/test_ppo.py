"""ppo.py: GAE in closed form, episode statistics, checkpoints, then what a user does with the script beyond
tests/test_family.py's table: other observation spaces, wandb, videos, seeds, a NaN, an edited copy."""

import os
import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch

import benchmark.pomdp  # noqa: F401  registers the velocity-masked envs in this process
import ppo
import tests.toy_envs  # noqa: F401  registers the toy envs in this process
from tests.conftest import edited_copy, only_run_dir, read_scalars, run_in_process, run_script

GAMMA, LAM = 0.9, 0.8


def gae(rewards, values, terminations=(), truncations=(), resets=(), next_value=0.0):
    """ppo.compute_gae on one env given as lists; flags are lists of the steps where they are set."""
    n = len(rewards)
    flags = [np.isin(np.arange(n), steps)[:, None] for steps in (terminations, truncations, resets)]
    adv, ret = ppo.compute_gae(
        np.array(rewards, np.float32)[:, None],
        np.array(values, np.float32)[:, None],
        *flags,
        np.array([next_value], np.float32),
        GAMMA,
        LAM,
    )
    return adv[:, 0], ret[:, 0]


# ---------------------------------------------------------------- GAE, with expected values worked out by hand


def test_gae_plain_episode():
    adv, ret = gae([1, 2, 3], [0.5, 1.0, 1.5], next_value=2.0)
    d2 = 3 + GAMMA * 2.0 - 1.5
    d1 = 2 + GAMMA * 1.5 - 1.0
    d0 = 1 + GAMMA * 1.0 - 0.5
    expected = [d0 + GAMMA * LAM * d1 + (GAMMA * LAM) ** 2 * d2, d1 + GAMMA * LAM * d2, d2]
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    np.testing.assert_allclose(ret, np.array(expected) + [0.5, 1.0, 1.5], rtol=1e-6)


def test_gae_termination_has_no_future():
    # step 1 terminates: values[2] is the value of the terminal observation and must not count; step 2 is the reset
    adv, _ = gae([1, 2, 0, 4], [0.5, 1.0, 9.0, 1.5], terminations=[1], resets=[2], next_value=2.0)
    a1 = 2 - 1.0
    a0 = (1 + GAMMA * 1.0 - 0.5) + GAMMA * LAM * a1
    a3 = 4 + GAMMA * 2.0 - 1.5
    np.testing.assert_allclose(adv, [a0, a1, 0.0, a3], rtol=1e-6)


def test_gae_truncation_bootstraps_from_final_observation():
    # step 1 is cut by a time limit: values[2], the value of its real final observation, is bootstrapped
    adv, _ = gae([1, 2, 0, 4], [0.5, 1.0, 9.0, 1.5], truncations=[1], resets=[2], next_value=2.0)
    a1 = 2 + GAMMA * 9.0 - 1.0
    a0 = (1 + GAMMA * 1.0 - 0.5) + GAMMA * LAM * a1
    a3 = 4 + GAMMA * 2.0 - 1.5
    np.testing.assert_allclose(adv, [a0, a1, 0.0, a3], rtol=1e-6)


def test_gae_reset_step_is_not_a_transition():
    # the previous rollout ended an episode, so step 0 only resets; its reward and values must reach no one
    adv, ret = gae([5, 1, 2], [7.0, 0.5, 1.0], resets=[0], next_value=2.0)
    a2 = 2 + GAMMA * 2.0 - 1.0
    a1 = (1 + GAMMA * 1.0 - 0.5) + GAMMA * LAM * a2
    np.testing.assert_allclose(adv, [0.0, a1, a2], rtol=1e-6)
    assert ret[0] == 7.0  # a reset step's return is its own value (and the batch leaves it out)


def test_gae_truncation_at_rollout_end_bootstraps_from_next_value():
    adv, _ = gae([1, 2], [0.5, 1.0], truncations=[1], next_value=3.0)
    np.testing.assert_allclose(adv[1], 2 + GAMMA * 3.0 - 1.0, rtol=1e-6)
    adv, _ = gae([1, 2], [0.5, 1.0], terminations=[1], next_value=3.0)
    np.testing.assert_allclose(adv[1], 2 - 1.0, rtol=1e-6)


# ---------------------------------------------------------------- the envs


def test_episode_statistics_count_real_steps_only():
    """make_envs: next-step autoreset, and RecordEpisodeStatistics' returns and lengths are those of the real steps
    (CartPole: reward 1 a step), the reset step after an episode counted in neither."""
    envs = ppo.make_envs("CartPole-v1", 3)
    envs.reset(seed=0)
    lengths, reported, reset_next = np.zeros(3, int), [], np.zeros(3, bool)
    for _ in range(300):
        _, reward, terminated, truncated, info = envs.step(envs.action_space.sample())
        assert (reward[reset_next] == 0).all()  # the reset step: reward 0, no transition
        lengths = np.where(reset_next, 0, lengths + 1)
        reset_next = terminated | truncated
        if "episode" in info:
            for i in np.flatnonzero(info["_episode"]):
                reported.append((info["episode"]["l"][i], info["episode"]["r"][i], lengths[i]))
    assert len(reported) > 10
    assert all(length == real and episode_return == real for length, episode_return, real in reported)


def test_any_observation_space_is_flattened():
    envs = ppo.make_envs("tests.toy_envs:MixedObsToy-v0", 2)  # a Dict of Box, MultiBinary, Tuple(Discrete, MD)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 2 + 3 + 3 + 2 + 4)  # Discrete and MultiDiscrete one-hot, as SB3 encodes them


def test_velocity_masked_envs_zero_the_velocities():
    env = gym.make("benchmark.pomdp:CartPoleNoVel-v1")
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        assert obs[1] == obs[3] == 0 and obs[0] != 0
        obs, *_ = env.step(1)
    assert str(env).count("TimeLimit") == 1 and env.spec.max_episode_steps == 500  # CartPole's own time limit, once


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_write_is_atomic(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    ppo.save_checkpoint(path, {"script": "ppo.py", "global_step": 7})
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        ppo.save_checkpoint(path, {"script": "ppo.py", "bad": lambda: 0})  # cannot be pickled: fails mid-write
    assert torch.load(path, weights_only=True)["global_step"] == 7  # the old file is whole


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_is_data_never_code(workdir):
    (workdir / "exploit.pt").write_bytes(pickle.dumps({"script": "ppo.py", "model": Exploit()}))
    result = run_in_process("ppo.py", "--eval-checkpoint", "exploit.pt", cwd=workdir)
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr
    assert not (workdir / "pwned").exists()


# ---------------------------------------------------------------- the script, run as a user runs it

SMALL = ["--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "2"]


@pytest.mark.parametrize(
    "env_id",
    [
        "FrozenLake-v1",  # Discrete observations, one-hot encoded
        "Blackjack-v1",  # a Tuple of Discrete observations
        "benchmark.pomdp:CartPoleNoVel-v1",  # an env module of this repository
    ],
)
def test_observation_spaces(workdir, env_id):
    result = run_in_process(
        "ppo.py", "--env-id", env_id, "--total-timesteps", "256", "--eval-episodes", "1", *SMALL, cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    assert torch.load(only_run_dir(workdir) / "checkpoint.pt", weights_only=True)["global_step"] == 256


def test_track_to_wandb_offline(workdir):
    result = run_script("ppo.py", "--track", "--total-timesteps", "256", "--eval-episodes", "0", *SMALL, cwd=workdir)
    assert result.returncode == 0, result.stderr
    offline_runs = list((only_run_dir(workdir) / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))


def test_capture_video_of_evaluation(workdir):
    result = run_in_process(
        "ppo.py", "--capture-video", "--total-timesteps", "256", "--eval-episodes", "2", *SMALL, cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    videos = list((only_run_dir(workdir) / "videos").glob("*.mp4"))
    assert len(videos) == 2 and all(v.stat().st_size > 1000 for v in videos)


def test_same_seed_same_run(workdir):
    returns = []
    for name in ("a", "b"):
        result = run_in_process(
            "ppo.py", "--total-timesteps", "6144", "--exp-name", name, "--eval-episodes", "0", cwd=workdir
        )
        assert result.returncode == 0, result.stderr
        (run_dir,) = (workdir / "runs").glob(f"*__{name}__*")
        returns.append(read_scalars(run_dir)["charts/episodic_return"])
    assert len(returns[0]) > 50 and returns[0] == returns[1]


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(workdir):
    args = ["--env-id", "tests.toy_envs:NaNDiscreteToy-v0", "--total-timesteps", "2048", "--save-interval", "1"]
    result = run_in_process("ppo.py", *args, *SMALL, cwd=workdir)
    assert result.returncode == 1 and "NaN or infinity" in result.stderr and "Traceback" not in result.stderr
    ckpt = torch.load(only_run_dir(workdir) / "checkpoint.pt", weights_only=True)
    assert 0 < ckpt["global_step"] < 2048
    assert all(torch.isfinite(p).all() for p in ckpt["model"].values())


TRUNK = [  # actor and critic on one shared first layer
    ("layer_init(nn.Linear(obs_dim, 64)),", "layer_init(nn.Linear(64, 64)),"),
    ("        self.critic = nn.Sequential(", "        self.trunk = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh())\n"
     "        self.critic = nn.Sequential("),
    ("    def get_value(self, x):\n", "    def get_value(self, x):\n        x = self.trunk(x)\n"),
    ("        logprobs = self.actor(x)", "        x = self.trunk(x)\n        logprobs = self.actor(x)"),
]  # fmt: skip
EDITS = {
    "relu": [("nn.Tanh()", "nn.ReLU()")],
    "layernorm": [("layer_init(nn.Linear(obs_dim, 64)),", "layer_init(nn.Linear(obs_dim, 64)), nn.LayerNorm(64),")],
    "shared trunk": TRUNK,
    "adamw": [("torch.optim.Adam(", "torch.optim.AdamW(")],
    "param groups": [
        (
            "torch.optim.Adam(agent.parameters(),",
            "torch.optim.Adam([{'params': agent.actor.parameters()}, "
            "{'params': agent.critic.parameters(), 'lr': 1e-3}],",
        )
    ],  # fmt: skip
}


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_copy_trains_and_plays(workdir, edit):
    """A researcher's first edits of a copy: it trains (the optimizer moves the network) and its greedy policy plays."""
    module = edited_copy("ppo.py", EDITS[edit], workdir)
    result = run_in_process(module, "--total-timesteps", "1024", "--eval-episodes", "1", *SMALL, cwd=workdir)
    assert result.returncode == 0 and "over 1 greedy episodes" in result.stdout, result.stderr
    approx_kl = [value for _, value in read_scalars(only_run_dir(workdir))["losses/approx_kl"]]
    assert min(approx_kl) > 0, f"the optimizer moved nothing: approx_kl {approx_kl}"
