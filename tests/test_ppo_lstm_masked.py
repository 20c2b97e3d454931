"""ppo_lstm_masked.py: masks obeyed by a recurrent policy in the rollout, the replay of sequences and the evaluation;
it learns a task that needs both memory and masks."""

import pytest

import tests.toy_envs as toys
from tests.conftest import run_in_process

SMALL = ["--num-envs", "2", "--num-steps", "64", "--seq-len", "16", "--num-minibatches", "4", "--update-epochs", "2"]


@pytest.mark.parametrize("env", ["StrictMaskedToy", "MaskedDictToy"])  # the mask in info, or in a Dict observation
def test_an_env_action_mask_is_obeyed(workdir, env):
    """StrictMaskedToy raises at a masked action; the first minibatch's ratio of 1 checks the masked replay."""
    toys.MaskedToy.violations = 0
    args = ["--env-id", f"tests.toy_envs:{env}-v0", "--total-timesteps", "1024", "--eval-episodes", "3", *SMALL]
    result = run_in_process("ppo_lstm_masked.py", *args, cwd=workdir)
    assert result.returncode == 0 and toys.MaskedToy.violations == 0, result.stderr
