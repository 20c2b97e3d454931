"""Bad input: one `error:` line naming the flag, exit status 2, no traceback, nothing written (the MPI scripts on one
rank; test_ppo_mpi.py runs two). In this process, as the script's
`__main__` block runs it (tests/conftest.py: run_in_process); test_main_block_exits_with_one_line checks that block."""

import pytest
import torch

from tests.conftest import run_in_process, run_script

CASES = [
    ("ppo.py", ["--num-minibatches", "3"], "--num-minibatches 3 does not divide the batch of 512"),
    ("ppo.py", ["--num-envs", "0"], "--num-envs 0 must be positive"),
    ("ppo.py", ["--num-steps", "-5"], "--num-steps -5 must be positive"),
    ("ppo.py", ["--total-timesteps", "100"], "less than one batch"),
    ("ppo.py", ["--gamma", "1.5"], "--gamma 1.5"),
    ("ppo.py", ["--learning-rate", "nan"], "--learning-rate nan"),
    ("ppo.py", ["--target-kl", "-1"], "--target-kl -1"),
    ("ppo.py", ["--env-id", "CartPol-v1"], "--env-id CartPol-v1"),
    ("ppo.py", ["--env-id", "nosuchmodule:Foo-v0"], "nosuchmodule"),
    ("ppo.py", ["--env-id", "Pendulum-v1"], "ppo_continuous.py"),
    ("ppo.py", ["--env-id", "tests.toy_envs:OffsetDiscreteToy-v0"], "Discrete ones from 0"),
    ("ppo.py", ["--eval-checkpoint", "missing.pt"], "--eval-checkpoint missing.pt"),
    ("ppo.py", ["--resume", "missing.pt"], "--resume missing.pt"),
    ("ppo.py", ["--eval-checkpoint", "ppo.pt"], "does not fit"),
    ("ppo.py", ["--resume", "ppo.pt", "--env-id", "Acrobot-v1"], "the checkpoint trained on CartPole-v1"),
    ("ppo.py", ["--eval-checkpoint", "ppo.pt", "--resume", "ppo.pt"], "exclude each other"),
    ("ppo_lstm.py", ["--seq-len", "5"], "--seq-len 5 does not divide --num-steps 32"),
    ("ppo_lstm.py", ["--num-minibatches", "9"], "--num-minibatches 9 is more than the 8 sequences"),
    ("ppo_lstm.py", ["--lstm-hidden-size", "0"], "--lstm-hidden-size 0 must be positive"),
    ("ppo_lstm.py", ["--env-id", "tests.toy_envs:MultiDiscreteToy-v0"], "ppo_lstm.py takes Discrete ones"),
    ("ppo_masked.py", ["--env-id", "Pendulum-v1"], "ppo_masked.py takes Discrete, MultiDiscrete and MultiBinary"),
    ("ppo_bc.py", ["--bc-epochs", "0"], "--bc-epochs 0 must be positive"),
    ("ppo_continuous.py", ["--num-minibatches", "3"], "--num-minibatches 3 does not divide the batch of 2048"),
    ("ppo_continuous.py", ["--hidden-size", "0"], "--hidden-size 0 must be positive"),
    ("ppo_continuous.py", ["--env-id", "CartPole-v1"], "ppo_continuous.py takes Box ones"),
    ("ppo_continuous.py", ["--resume", "ppo.pt"], "--resume ppo.pt was not written by ppo_continuous.py"),
    ("ppo_gsde.py", ["--sde-sample-freq", "0"], "--sde-sample-freq 0 must be positive, or -1"),
    ("ppo_mpi.py", ["--total-timesteps", "100"], "less than one batch"),
    ("ppo_atari.py", ["--env-id", "CartPole-v1"], "--env-id CartPole-v1 is not one of envpool's Atari games"),
    ("ppo_atari.py", ["--num-minibatches", "3"], "--num-minibatches 3 does not divide the batch of 1024"),
    ("ppo_atari_mpi.py", ["--env-id", "Pendulum-v1"], "is not one of envpool's Atari games"),
]


@pytest.mark.parametrize("script, args, message", CASES)
def test_bad_input_gives_one_clear_line(script, args, message, workdir):
    torch.save(
        {"script": "ppo.py", "args": {"env_id": "CartPole-v1"}, "global_step": 0, "model": {}}, workdir / "ppo.pt"
    )
    result = run_in_process(script, *args, cwd=workdir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (workdir / "runs").exists()  # rejected before any work started


@pytest.mark.parametrize("script", ["ppo.py", "ppo_mpi.py"])
def test_main_block_exits_with_one_line(script, workdir):
    """The __main__ block: our one line for a bad value, tyro's own message for one it cannot parse."""
    for args, expected in (
        (["--num-envs", "0"], "error: --num-envs 0 must be positive"),
        (["--num-envs", "x"], "--num-envs"),
    ):
        result = run_script(script, *args, cwd=workdir, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr and expected in result.stderr, result.stderr
