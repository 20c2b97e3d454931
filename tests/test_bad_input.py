"""Bad input, in every script that runs without MPI (ppo_mpi.py's are in test_ppo_mpi.py, on two ranks): one
`error:` line naming the flag, exit status 2, no traceback, nothing written. In this process, as the script's
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
    ("ppo_continuous.py", ["--bc-learning-rate", "nan"], "--bc-learning-rate nan must be a positive number"),
    ("ppo_continuous.py", ["--sde-sample-freq", "-1"], "--sde-sample-freq must be 0 (each rollout's start) or more"),
    ("ppo_continuous.py", ["--log-std-init", "nan"], "--log-std-init nan must be a finite number"),
    ("ppo_continuous.py", ["--num-minibatches", "3"], "--num-minibatches 3 does not divide the batch of 2048"),
    ("ppo_continuous.py", ["--total-timesteps", "100"], "less than one batch"),
    ("ppo_continuous.py", ["--env-id", "CartPole-v1"], "use ppo.py"),
    ("ppo_continuous.py", ["--env-id", "tests.toy_envs:MultiDiscreteToy-v0"], "use ppo.py"),
    ("ppo_continuous.py", ["--env-id", "tests.toy_envs:TextObsToy-v0"], "supported are Box, Discrete"),
    ("ppo_continuous.py", ["--env-id", "CheetahRun-v1", "--capture-video"], "--capture-video"),
    ("ppo_continuous.py", ["--eval-checkpoint", "missing.pt"], "--eval-checkpoint missing.pt: no such file"),
    ("ppo_continuous.py", ["--mask-velocity"], "--mask-velocity: no velocity entries known for HalfCheetah-v4"),
    ("ppo_continuous.py", ["--hidden-size", "0"], "--hidden-size 0 must be positive"),
    ("ppo_atari.py", ["--env-id", "CartPole-v1"], "--env-id CartPole-v1 is not an Atari game: use ppo.py"),
    ("ppo_atari.py", ["--num-minibatches", "3"], "--num-minibatches 3 does not divide the batch of 1024"),
    ("ppo_atari.py", ["--resume", "ppo.pt"], "--resume ppo.pt was written by ppo.py; load it with that script"),
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


@pytest.mark.parametrize("script", ["ppo.py", "ppo_continuous.py", "ppo_atari.py", "ppo_lstm.py"])
def test_main_block_exits_with_one_line(script, workdir):
    rebuilt = script in ("ppo.py", "ppo_lstm.py")  # leaves a value it cannot parse to tyro's own message
    message = "--num-envs 0 must be positive"
    for args, expected in ((["--num-envs", "0"], message), (["--num-envs", "x"], "--num-envs")):
        result = run_script(script, *args, cwd=workdir, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert expected in result.stderr and (rebuilt and args[1] == "x" or result.stderr.startswith("error: "))
