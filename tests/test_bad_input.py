"""Bad input: one `error:` line naming the flag, exit status 2, no traceback, nothing written (the MPI scripts on one
rank; test_ppo_mpi.py runs two). In this process, as the script's `__main__` block runs it (tests/conftest.py:
run_in_process); test_main_block_exits_with_one_line checks that block."""

import pytest
import torch

from tests.conftest import run_in_process, run_script

CASES = [  # script, flags: each wrong in its own way (a message naming the flag, not checked word for word)
    ("ppo.py", ["--num-minibatches", "3"]),
    ("ppo.py", ["--num-envs", "0"]),
    ("ppo.py", ["--num-steps", "-5"]),
    ("ppo.py", ["--total-timesteps", "100"]),
    ("ppo.py", ["--gamma", "1.5"]),
    ("ppo.py", ["--learning-rate", "nan"]),
    ("ppo.py", ["--target-kl", "-1"]),
    ("ppo.py", ["--env-id", "CartPol-v1"]),
    ("ppo.py", ["--env-id", "nosuchmodule:Foo-v0"]),
    ("ppo.py", ["--env-id", "Pendulum-v1"]),
    ("ppo.py", ["--env-id", "tests.toy_envs:OffsetDiscreteToy-v0"]),
    ("ppo.py", ["--eval-checkpoint", "missing.pt"]),
    ("ppo.py", ["--resume", "missing.pt"]),
    ("ppo.py", ["--eval-checkpoint", "ppo.pt"]),
    ("ppo.py", ["--resume", "ppo.pt", "--env-id", "Acrobot-v1"]),
    ("ppo.py", ["--eval-checkpoint", "ppo.pt", "--resume", "ppo.pt"]),
    ("ppo_lstm.py", ["--seq-len", "5"]),
    ("ppo_lstm.py", ["--num-minibatches", "9"]),
    ("ppo_lstm.py", ["--lstm-hidden-size", "0"]),
    ("ppo_lstm.py", ["--env-id", "tests.toy_envs:MultiDiscreteToy-v0"]),
    ("ppo_masked.py", ["--env-id", "Pendulum-v1"]),
    ("ppo_bc.py", ["--bc-epochs", "0"]),
    ("ppo_continuous.py", ["--num-minibatches", "3"]),
    ("ppo_continuous.py", ["--hidden-size", "0"]),
    ("ppo_continuous.py", ["--env-id", "CartPole-v1"]),
    ("ppo_continuous.py", ["--resume", "ppo.pt"]),
    ("ppo_gsde.py", ["--sde-sample-freq", "0"]),
    ("ppo_mpi.py", ["--total-timesteps", "100"]),
    ("ppo_atari.py", ["--env-id", "CartPole-v1"]),
    ("ppo_atari.py", ["--num-minibatches", "3"]),
    ("ppo_atari_mpi.py", ["--env-id", "Pendulum-v1"]),
    ("ppo_pbt.py", ["--learning-rate", "1e-2", "1e-5"]),
    ("ppo_pbt.py", ["--update-epochs", "0", "4"]),
    ("ppo_pbt.py", ["--truncation", "1"]),
    ("ppo_pbt.py", ["--tournament-size", "0"]),
    ("ppo_pbt.py", ["--resample-probability", "1.5"]),
    ("ppo_pbt.py", ["--copy-threshold", "nan"]),
    ("ppo_bc.py", []),
    ("ppo_bc.py", ["--expert", "missing.pt"]),
    ("ppo_bc.py", ["--expert", "bytes.pt"]),
]


@pytest.mark.parametrize("script, args", CASES)
def test_bad_input_gives_one_clear_line(script, args, workdir):
    torch.save(
        {"script": "ppo.py", "args": {"env_id": "CartPole-v1"}, "global_step": 0, "model": {}}, workdir / "ppo.pt"
    )
    (workdir / "bytes.pt").write_bytes(b"not a checkpoint")
    result = run_in_process(script, *args, cwd=workdir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not args or args[0] in lines[0]  # it names the flag
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
