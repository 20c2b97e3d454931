"""ppo_masked.py (and ppo_lstm_masked.py, its lines on ppo_lstm.py): masked actions get probability 0 in the rollout,
the update and the evaluation; MultiDiscrete and MultiBinary actions reach the env in its own layout."""

import gymnasium as gym
import pytest
import torch

import benchmark.masked_tasks  # noqa: F401  registers ConnectFour-v0 in this process
import ppo_masked
import tests.toy_envs as toys
from tests.conftest import only_run_dir, run_in_process

SMALL = ["--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "2"]


def test_a_masked_action_has_probability_zero():
    envs = ppo_masked.make_envs("tests.toy_envs:MaskedToy-v0", 1)
    agent = ppo_masked.Agent(envs)
    mask = torch.tensor([[True, False, True, False, False, True, True]])  # components of 4 and 3 actions
    x = torch.randn(1, 2)
    actions = torch.stack([agent.get_action_and_value(x, mask=mask)[0][0] for _ in range(200)])
    assert set(actions[:, 0].tolist()) == {0, 2} and set(actions[:, 1].tolist()) == {1, 2}
    _, logprob, entropy, _ = agent.get_action_and_value(x, torch.tensor([[1, 2]]), mask=mask)
    assert logprob.exp().item() == 0.0 and torch.isfinite(entropy).all()
    greedy = agent.get_action_and_value(x, mask=mask, greedy=True)[0]
    assert mask[0, greedy[0, 0]] and mask[0, 4 + greedy[0, 1]]


@pytest.mark.parametrize("script", ["ppo_masked.py", "ppo_lstm_masked.py"])
@pytest.mark.parametrize("env", ["StrictMaskedToy", "MaskedDictToy"])  # the mask in info, or in a Dict observation
def test_an_env_action_mask_is_obeyed(workdir, script, env):
    """StrictMaskedToy raises at a masked action, MaskedDictToy counts it; without the mask, masked actions happen. (The
    first minibatch's ratio of 1 checks the masked update, ppo_lstm_masked.py's replay of sequences included.)"""
    toys.MaskedToy.violations = 0
    args = ["--env-id", f"tests.toy_envs:{env}-v0", "--total-timesteps", "1024", "--eval-episodes", "3", *SMALL]
    result = run_in_process(script, *args, *["--seq-len", "16"] * (script == "ppo_lstm_masked.py"), cwd=workdir)
    assert result.returncode == 0 and toys.MaskedToy.violations == 0, result.stderr
    if env == "MaskedDictToy":
        result = run_in_process("ppo_masked.py", *args, "--no-action-mask", "--exp-name", "nomask", cwd=workdir)
        assert result.returncode == 0 and toys.MaskedToy.violations > 0, result.stderr


@pytest.mark.parametrize("env", ["MultiDiscreteToy", "MultiBinaryToy", "OffsetDiscreteToy"])
def test_action_spaces_reach_the_env_in_its_layout(workdir, env):
    """Each toy env asserts that its actions lie in its space (layout, start); greedy actions learn its target."""
    args = ["--env-id", f"tests.toy_envs:{env}-v0", "--total-timesteps", "1024", "--eval-episodes", "1", *SMALL]
    result = run_in_process("ppo_masked.py", *args, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert torch.load(only_run_dir(workdir) / "checkpoint.pt", weights_only=True)["global_step"] == 1024


def test_masks_move_out_of_a_dict_observation():
    envs = ppo_masked.make_envs("benchmark.masked_tasks:ConnectFour-v0", 2)
    obs, info = envs.reset(seed=0)
    assert obs.shape == (2, 42) and info["action_mask"].shape == (2, 7) and info["_action_mask"].all()
    masks = ppo_masked.action_masks(info, 2, 7, True, "cpu")
    assert masks.dtype == torch.bool and masks.all()  # an empty board: every column open
    assert ppo_masked.action_masks({}, 2, 7, True, "cpu").all()  # no mask given: every action allowed
    assert isinstance(envs.single_observation_space, gym.spaces.Box)
