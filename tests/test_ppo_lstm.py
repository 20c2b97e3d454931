"""ppo_lstm.py: the LSTM replayed in stretches equals running it step by step, its state restarts at an episode's
first observation, the issue's command runs (tests/test_family.py runs it on Box actions and checks its learning)."""

import torch

import ppo_lstm
import tests.toy_envs  # noqa: F401  registers the toy envs in this process
from tests.conftest import run_in_process

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
