"""ppo_mpi.py: what it adds to ppo.py and ppo_continuous.py (learning-rate schedules, the union of their agents) by
hand, its collective helpers and bit-identical ranks under `mpiexec -n 2` (tests/ppo_mpi_ranks.py), then the script
as a user runs it on 2 ranks and on 1 (steps of all ranks, episodes of all ranks, a checkpoint of 2 ranks resumed on
1, a Box task with its statistics, errors that end every rank, learning)."""

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_mpi as pm
import tests.toy_envs  # registers the toy envs in this process too
from tests.conftest import REPO, only_run_dir, read_scalars, run_script

# MPICH's mpiexec, installed with the venv's Python by requirements.txt (the `mpich` wheel): no system MPI needed.
MPIEXEC = Path(sys.executable).with_name("mpiexec")


def mpirun(num_ranks: int, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `mpiexec -n NUM_RANKS python ARGS` in cwd, wandb offline. The fork launcher starts every rank on this
    machine (never ssh); an outer MPI job's variables are dropped so that this mpiexec starts a job of its own."""
    if not MPIEXEC.exists():
        pytest.fail(f"no {MPIEXEC}: install requirements.txt (mpi4py and mpich) into this Python's venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "HYDI_"))}
    env |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    command = [str(MPIEXEC), "-launcher", "fork", "-n", str(num_ranks), sys.executable, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- learning-rate schedules


def test_lr_schedules_are_stable_baselines_ones():
    """The multipliers of baselines/a2c/utils.py, worked out at the progress where each changes."""
    expected = {
        "constant": [(0.0, 1.0), (0.5, 1.0), (0.99, 1.0)],
        "linear": [(0.0, 1.0), (0.25, 0.75), (0.9, 0.1)],
        "middle_drop": [(0.0, 1.0), (0.25, 0.75), (0.26, 0.075), (0.99, 0.075)],
        "double_linear_con": [(0.0, 1.0), (0.25, 0.5), (0.4375, 0.125), (0.45, 0.125), (0.99, 0.125)],
        "double_middle_drop": [(0.0, 1.0), (0.25, 0.75), (0.26, 0.075), (0.75, 0.075), (0.76, 0.125), (0.99, 0.125)],
    }
    assert set(expected) == set(pm.Args.__annotations__["lr_schedule"].__args__)
    for schedule, points in expected.items():
        for progress, multiplier in points:
            assert pm.lr_multiplier(schedule, progress) == pytest.approx(multiplier), (schedule, progress)


# ---------------------------------------------------------------- the agent: ppo.py's or ppo_continuous.py's


SPACES = {
    "discrete": (gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2)),
    "multidiscrete ragged 2-D": (gym.spaces.Box(-1, 1, (3, 2)), gym.spaces.MultiDiscrete([[3, 2], [4, 5]])),
    "discrete observations": (gym.spaces.Discrete(7), gym.spaces.Discrete(3)),
    "box 2-D": (gym.spaces.Box(-1, 1, (3, 2)), gym.spaces.Box(-2, 1, (2, 2))),
    "discrete observations, box actions": (gym.spaces.Discrete(7), gym.spaces.Box(-2, 1, (2,))),
    "nested observations": (tests.toy_envs.MixedObsToy.observation_space, gym.spaces.MultiDiscrete([3, 2])),
}


@pytest.mark.parametrize("name", SPACES)
def test_numpy_policy_matches_torch(name):
    obs_space, act_space = SPACES[name]
    torch.manual_seed(0)
    agent = pm.Agent(obs_space, act_space)
    with torch.no_grad():  # larger output weights than the init's, so that the distributions are far from uniform
        agent.actor[-1].weight.mul_(300)
    policy = pm.numpy_policy(agent, np.random.default_rng(0))
    samples = gym.vector.utils.batch_space(obs_space, 64)
    samples.seed(0)
    obs = pm.encode_obs(obs_space, samples.sample())
    action, logprob, value = policy(obs)
    assert action.shape == (64, agent.action_size)
    _, t_logprob, _, t_value = agent.get_action_and_value(torch.from_numpy(obs), torch.from_numpy(action))
    np.testing.assert_allclose(logprob, t_logprob.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(value, t_value.detach().numpy(), rtol=1e-4, atol=1e-5)
    env_action = pm.to_env_action(action, act_space)
    assert all(act_space.contains(a.astype(act_space.dtype)) for a in env_action)  # Box: clipped to the bounds


def test_the_agent_is_that_of_ppo_continuous_py():
    import ppo_continuous as pc

    for module, spaces in ((pc, SPACES["box 2-D"]),):
        torch.manual_seed(0)
        reference = module.Agent(*spaces).state_dict()
        torch.manual_seed(0)
        agent = pm.Agent(*spaces).state_dict()
        assert agent.keys() == reference.keys() and all(torch.equal(agent[k], reference[k]) for k in agent)


def test_unsupported_spaces_are_named():
    with pytest.raises(pm.UserError, match="observations are Text"):
        pm.Agent(gym.spaces.Tuple([gym.spaces.Text(3)]), gym.spaces.Discrete(2))
    with pytest.raises(pm.UserError, match="not Tuple"):
        pm.Agent(gym.spaces.Box(-1, 1, (2,)), gym.spaces.Tuple([gym.spaces.Discrete(2)]))


def test_another_mpis_mpiexec_is_named():
    """Open MPI's mpiexec would start N single-rank runs of this MPICH build: each stops, naming the right mpiexec."""
    from mpi4py import MPI

    with pytest.raises(pm.UserError, match=r"started 2 processes, but MPI sees 1 rank\(s\) in each.*bin/mpiexec"):
        pm.check_launcher(MPI.COMM_WORLD, {"OMPI_COMM_WORLD_SIZE": "2"})
    pm.check_launcher(MPI.COMM_WORLD, {"PMI_SIZE": "1"})
    pm.check_launcher(MPI.COMM_WORLD, {})


# ---------------------------------------------------------------- under mpiexec


def test_collective_helpers_and_identical_ranks(workdir):
    """tests/ppo_mpi_ranks.py on 2 ranks: merged statistics, scaled rewards, the bitwise comparison, a set-up error on
    one rank, two trainings (CartPole with --target-kl, Pendulum with normalisation) whose final state is gathered
    from both ranks and compared byte for byte, and a divergence that fails loudly."""
    result = mpirun(2, str(REPO / "tests" / "ppo_mpi_ranks.py"), cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok:") and "training_keeps_every_rank_identical" in result.stdout


LOSS_KEYS = ["value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac", "explained_variance"]
KEYS = ["charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS"]
KEYS += [f"losses/{k}" for k in LOSS_KEYS]
SMALL = ["--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "2"]


def test_two_ranks_log_all_steps_and_episodes_and_resume_on_one(workdir):
    # 2 ranks x 2 envs x 64 steps: 256 steps of all ranks an iteration, 4 iterations
    result = mpirun(
        2, str(REPO / "ppo_mpi.py"), *SMALL, "--total-timesteps", "1024", "--lr-schedule", "middle_drop",
        "--save-interval", "1", "--eval-episodes", "2", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    scalars = read_scalars(run_dir)
    assert set(KEYS) <= set(scalars), set(KEYS) - set(scalars)
    assert [step for step, _ in scalars["charts/SPS"]] == [256, 512, 768, 1024]
    lrs = [lr for _, lr in scalars["charts/learning_rate"]]
    np.testing.assert_allclose(lrs, [2.5e-4 * f for f in (1, 0.75, 0.075, 0.075)], rtol=1e-5)  # middle_drop
    # the episodes of both ranks: more real steps than one rank made (512); the rest are unfinished or reset steps
    lengths = [length for _, length in scalars["charts/episodic_length"]]
    assert 512 < sum(lengths) <= 1024 - len(lengths), sum(lengths)
    assert result.stdout.count("done: 1,024 steps") == 1 and "on 2 ranks, identical at the end" in result.stdout
    assert result.stdout.count("eval CartPole-v1:") == 1  # rank 0 alone evaluates and prints
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["script"] == "ppo_mpi.py" and ckpt["global_step"] == 1024 and ckpt["num_ranks"] == 2
    assert {"model", "optimizer"} <= ckpt.keys() and "obs_rms" not in ckpt  # discrete actions: no normalisation

    # the single-rank path, no mpiexec: the 2 ranks' checkpoint goes on with 128 steps an iteration
    result = run_script(
        "ppo_mpi.py", *SMALL, "--total-timesteps", "1536", "--resume", str(run_dir / "checkpoint.pt"),
        "--eval-episodes", "0", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "done: 1,536 steps" in result.stdout and "on 1 rank;" in result.stdout
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert resumed["global_step"] == 1536 and resumed["num_ranks"] == 1
    assert not torch.equal(resumed["model"]["actor.0.weight"], ckpt["model"]["actor.0.weight"])
    scalars = read_scalars(run_dir)  # the curves continue in the same folder, the linear schedule where it stands
    assert [step for step, _ in scalars["charts/SPS"]][4:] == [1152, 1280, 1408, 1536]
    np.testing.assert_allclose(
        [lr for _, lr in scalars["charts/learning_rate"]][4:],
        [2.5e-4 * (1 - step / 1536) for step in (1024, 1152, 1280, 1408)],
        rtol=1e-5,
    )


def test_atari_on_two_ranks_ends_identical_and_resumes_on_one(workdir):
    """ppo_atari.py's game, preprocessing and Nature CNN on 2 ranks: the ranks end bit for bit identical (the script
    checks it), the checkpoint goes on on 1 rank, and its greedy evaluation plays whole games."""
    atari = ["--env-id", "Breakout-v5", "--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2"]
    args = [str(REPO / "ppo_mpi.py"), *atari, "--update-epochs", "2", "--eval-episodes", "0"]
    result = mpirun(2, *args, "--total-timesteps", "256", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "done: 256 steps" in result.stdout and "on 2 ranks, identical at the end" in result.stdout
    checkpoint = only_run_dir(workdir) / "checkpoint.pt"
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["num_ranks"] == 2 and ckpt["model"]["network.0.weight"].shape == (32, 4, 8, 8)  # the Nature CNN
    result = run_script(*args, "--total-timesteps", "320", "--resume", str(checkpoint), cwd=workdir)
    assert result.returncode == 0 and "done: 320 steps" in result.stdout and "on 1 rank;" in result.stdout
    result = run_script(
        str(REPO / "ppo_mpi.py"), "--eval-checkpoint", str(checkpoint), "--eval-episodes", "1", cwd=workdir
    )
    assert result.returncode == 0 and "eval Breakout-v5:" in result.stdout, result.stderr


def test_box_task_on_two_ranks_merges_the_statistics(workdir):
    # Pendulum, 2 ranks x 2 envs x 256 steps, 2 iterations: each env makes 512 steps, episodes truncate at 200
    result = mpirun(
        2, str(REPO / "ppo_mpi.py"), "--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "256",
        "--num-minibatches", "4", "--update-epochs", "2", "--ent-coef", "0", "--total-timesteps", "2048",
        "--eval-episodes", "0", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    lengths = [length for _, length in read_scalars(run_dir)["charts/episodic_length"]]
    assert lengths == [200] * 8  # 2 episodes of each of the 4 envs of both ranks
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    # the statistics of all ranks: every observation the policies saw (2048), every step but the 8 reset steps
    assert ckpt["obs_rms"]["count"] == pytest.approx(2048 + 1e-4) and ckpt["obs_rms"]["mean"].shape == (3,)
    assert ckpt["return_rms"]["count"] == pytest.approx(2040 + 1e-4)
    checkpoint = str(run_dir / "checkpoint.pt")
    result = run_script("ppo_mpi.py", "--eval-checkpoint", checkpoint, "--eval-episodes", "1", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "eval Pendulum-v1:" in result.stdout  # evaluated with the checkpoint's statistics, on one rank


def test_a_batch_is_the_steps_of_every_rank():
    with pytest.raises(pm.UserError, match=r"less than one batch of 1024 steps \(2 ranks x --num-envs 4 x"):
        pm.validate_args(pm.Args(total_timesteps=600), 2)
    pm.validate_args(pm.Args(total_timesteps=600), 1)  # ppo.py's batch of 512 steps fits


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-minibatches", "3"], "error: --num-minibatches 3 does not divide the batch of 512"),
        (["--lr-schedule", "fast"], "fast"),
        (["--resume", "missing.pt"], "error: rank 0: --resume missing.pt: no such file"),  # read on rank 0 alone
        (["--env-id", "Breakout-v5", "--num-envs", "3", "--num-minibatches", "5"], "does not divide the batch of 384"),
    ],
)
def test_bad_input_stops_every_rank_with_one_line(workdir, args, message):
    result = mpirun(2, str(REPO / "ppo_mpi.py"), *args, cwd=workdir, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count(message) == 1, result.stderr
    assert not (workdir / "runs").exists()  # rejected before any work started


def test_action_masks_are_obeyed_on_two_ranks(workdir):
    """ppo.py's action masking on 2 ranks: an env that fails at a masked action trains and evaluates to the end (the
    guard checks every update against the rollout's masks); with --no-action-mask it fails."""
    args = [str(REPO / "ppo_mpi.py"), "--env-id", "tests.toy_envs:StrictMaskedToy-v0", *SMALL, "--eval-episodes", "2"]
    result = mpirun(2, *args, "--total-timesteps", "1024", cwd=workdir, timeout=60)
    assert result.returncode == 0 and "note:" not in result.stdout, result.stderr
    assert "done: 1,024 steps" in result.stdout and "eval tests.toy_envs:StrictMaskedToy-v0" in result.stdout
    result = mpirun(2, *args, "--total-timesteps", "1024", "--no-action-mask", cwd=workdir, timeout=60)
    assert result.returncode == 1 and "is masked out" in result.stderr, result.stderr


def test_an_error_on_one_rank_ends_every_rank(workdir):
    # rank 1's envs raise after 300 steps, during training: rank 0 would wait for it in a collective call for ever
    result = mpirun(
        2, str(REPO / "ppo_mpi.py"), "--env-id", "tests.ppo_mpi_ranks:CrashOnRank1-v0", *SMALL,
        "--total-timesteps", "100000", cwd=workdir, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: rank 1 of 2 failed (RuntimeError: CrashOnRank1: the env broke on rank 1)" in result.stderr
    assert "done:" not in result.stdout


def test_an_error_on_one_rank_ends_every_rank_on_atari(workdir):
    atari = ["--env-id", "Breakout-v5", "--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2"]
    result = mpirun(
        2, str(REPO / "tests" / "ppo_mpi_ranks.py"), "crash-envpool", *atari, "--total-timesteps", "100000",
        cwd=workdir, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: rank 1 of 2 failed (RuntimeError: CrashingEnvs: the env broke on rank 1)" in result.stderr
    assert "done:" not in result.stdout


# Calibration: 2 ranks x 2 envs (ppo.py's batch of 512 steps, from both ranks), seeds 1-8 at 100k steps reached a mean
# return over their last 20 episodes of 287, 313, 263, 252, 222, 236, 240, 290 (mean 263; ppo.py's test: 269); the
# threshold, ppo.py's, sits below the worst seed and far above an untrained policy (~22).
LEARNING_STEPS, LEARNING_THRESHOLD = 100_000, 150


def test_learns_cartpole_on_two_ranks(workdir):
    result = mpirun(
        2, str(REPO / "ppo_mpi.py"), "--num-envs", "2", "--total-timesteps", str(LEARNING_STEPS), "--seed", "1",
        "--eval-episodes", "0", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    returns = [r for _, r in read_scalars(only_run_dir(workdir))["charts/episodic_return"]]
    assert np.mean(returns[-20:]) >= LEARNING_THRESHOLD, np.mean(returns[-20:])
