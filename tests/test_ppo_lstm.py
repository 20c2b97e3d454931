"""ppo_lstm.py: the LSTM replayed in stretches equals running it step by step, its state restarts at an episode's
first observation, Box and Discrete actions run, and it learns a task that needs memory."""

import numpy as np
import pytest
import torch

import ppo_lstm
import tests.toy_envs  # noqa: F401  registers the toy envs in this process
from tests.conftest import only_run_dir, read_scalars, run_in_process

SMALL = ["--num-envs", "2", "--num-steps", "64", "--seq-len", "16", "--num-minibatches", "4", "--update-epochs", "2"]


def agent_and_inputs(steps=12, envs=3):
    torch.manual_seed(0)
    agent = ppo_lstm.Agent(ppo_lstm.make_envs("CartPole-v1", 1), lstm_hidden_size=8)
    x = torch.randn(steps * envs, 4)
    starts = torch.zeros(steps, envs, dtype=torch.bool)
    starts[3, 0] = starts[7, 2] = starts[8, 0] = True
    state = (torch.randn(1, envs, 8), torch.randn(1, envs, 8))
    return agent, x, starts.flatten(), state


def test_replay_equals_running_step_by_step():
    agent, x, starts, state = agent_and_inputs()
    with torch.no_grad():
        replayed, final = agent.get_states(x, state, starts)
        stepped, step_state = [], state
        for t in range(12):
            out, step_state = agent.get_states(x[3 * t : 3 * t + 3], step_state, starts[3 * t : 3 * t + 3])
            stepped.append(out)
    torch.testing.assert_close(replayed, torch.cat(stepped), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final, step_state, rtol=1e-5, atol=1e-6)


def test_the_state_restarts_at_an_episode_start():
    agent, x, starts, state = agent_and_inputs()
    zero = (torch.zeros_like(state[0]), torch.zeros_like(state[1]))
    with torch.no_grad():
        out, _ = agent.get_states(x[9:12], state, torch.tensor([True, False, False]))  # env 0 starts
        fresh, _ = agent.get_states(x[9:12], zero, torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(out[0], fresh[0])  # env 0: as from a zero state
    assert not torch.allclose(out[1], fresh[1])  # env 1 goes on from its state


def test_the_issue_command_just_works(workdir):
    result = run_in_process("ppo_lstm.py", "--env-id", "CartPole-v1", "--total-timesteps", "5000", cwd=workdir)
    assert result.returncode == 0 and "greedy episodes" in result.stdout, result.stderr


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "benchmark.pomdp:PendulumNoVel-v1"])
def test_box_actions_train_evaluate_and_resume(workdir, env_id):
    """Sequences of 16 of a 64-step rollout, 4 minibatches: the first minibatch's ratio of 1 checks their replay."""
    args = ["--env-id", env_id, "--total-timesteps", "256", "--eval-episodes", "1", *SMALL]
    result = run_in_process("ppo_lstm.py", *args, cwd=workdir)
    assert result.returncode == 0, result.stderr
    checkpoint = only_run_dir(workdir) / "checkpoint.pt"
    assert "actor_logstd" in torch.load(checkpoint, weights_only=True)["model"]
    result = run_in_process("ppo_lstm.py", "--eval-checkpoint", str(checkpoint), "--eval-episodes", "1", cwd=workdir)
    assert result.returncode == 0, result.stderr
    result = run_in_process("ppo_lstm.py", *args[:2], "--total-timesteps", "512", "--resume", str(checkpoint), *SMALL,
                            cwd=workdir)  # fmt: skip
    assert result.returncode == 0 and torch.load(checkpoint, weights_only=True)["global_step"] == 512, result.stderr


def test_bad_sequence_lengths_are_one_line(workdir):
    for flags, message in ((["--seq-len", "5"], "--seq-len 5 does not divide"), (["--num-minibatches", "9"], "9 is")):
        result = run_in_process("ppo_lstm.py", *flags, cwd=workdir)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1


# Calibration, CueRecallToy (tests/toy_envs.py: recall a cue shown 6 steps before), 20k steps, mean return of the last
# 100 episodes, seeds 1-5: 1.00, 1.00, 1.00, -0.12, 1.00 (greedy 1.00 but seed 4's 0.40). A policy without memory
# is right half the time: expected return 0.
def test_learns_to_remember_a_cue(workdir):
    args = ["--env-id", "tests.toy_envs:CueRecallToy-v0", "--total-timesteps", "20000", "--eval-episodes", "20"]
    result = run_in_process("ppo_lstm.py", *args, cwd=workdir)
    assert result.returncode == 0, result.stderr
    returns = [r for _, r in read_scalars(only_run_dir(workdir))["charts/episodic_return"]]
    assert np.mean(returns[-100:]) >= 0.7, np.mean(returns[-100:])
    # the greedy evaluation carries the state through each episode and restarts it at the next
    assert float(result.stdout.split("CueRecallToy-v0: ")[1].split()[0]) >= 0.9, result.stdout
