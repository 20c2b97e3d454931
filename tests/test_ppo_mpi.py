"""ppo_mpi.py and ppo_atari_mpi.py on two ranks: statistics merged as NumPy pools them, every rank's network,
optimizer and statistics identical after training, a checkpoint of two ranks resumed on one, no seed shared by two
envs, an error on one rank ends them all. (On one rank, in this process: tests/test_ppo_continuous.py and
tests/test_ppo_atari.py.)"""

import re

import pytest
import torch

from tests.conftest import REPO, edited_copy, mpirun, only_run_dir, run_in_process

PENDULUM = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2"]
PENDULUM += ["--update-epochs", "2", "--total-timesteps", "1024", "--eval-episodes", "0"]
BREAKOUT = ["--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "1"]
BREAKOUT += ["--total-timesteps", "256", "--eval-episodes", "0"]
EVERY_RANK_SAVES = [  # an edited copy in which every rank writes its own checkpoint
    ('checkpoint_path = os.path.join(run_dir, "checkpoint.pt")',
     'checkpoint_path = os.path.join(run_dir, f"checkpoint{comm.rank}.pt")'),
    ("if due and comm.rank == 0:", "if due:"),
]  # fmt: skip


def test_merged_statistics_are_those_of_all_ranks_data(workdir):
    result = mpirun(2, str(REPO / "tests" / "mpi_ranks.py"), cwd=workdir, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_ranks_stay_identical_and_resume_on_one(workdir):
    module = edited_copy("ppo_mpi.py", EVERY_RANK_SAVES, workdir)
    result = mpirun(2, module.__file__, *PENDULUM, cwd=workdir)
    assert result.returncode == 0 and result.stdout.count("done: 1,024 steps") == 1, result.stderr
    run_dir = only_run_dir(workdir)
    ckpts = [torch.load(run_dir / f"checkpoint{rank}.pt", weights_only=True) for rank in (0, 1)]
    for key in ("model", "obs_rms", "return_rms"):
        for name, value in ckpts[0][key].items():
            assert torch.equal(value, ckpts[1][key][name]), f"{key} {name} differs between the ranks"
    for state0, state1 in zip(ckpts[0]["optimizer"]["state"].values(), ckpts[1]["optimizer"]["state"].values()):
        assert all(torch.equal(state0[k], state1[k]) for k in state0)
    assert ckpts[0]["obs_rms"]["count"] > 1024  # both ranks' observations

    # the checkpoint of two ranks resumes on one: the global step and the lr schedule go on
    (run_dir / "checkpoint0.pt").rename(run_dir / "checkpoint.pt")
    resume = ["--resume", str(run_dir / "checkpoint.pt"), *PENDULUM[:-4], "--total-timesteps", "1280"]
    result = run_in_process("ppo_mpi.py", *resume, "--eval-episodes", "0", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"] == 1280


def test_atari_ranks_stay_identical(workdir):
    module = edited_copy("ppo_atari_mpi.py", EVERY_RANK_SAVES, workdir)
    result = mpirun(2, module.__file__, *BREAKOUT, cwd=workdir)
    assert result.returncode == 0 and "done: 256 steps" in result.stdout, result.stderr
    ckpts = [torch.load(only_run_dir(workdir) / f"checkpoint{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(torch.equal(value, ckpts[1]["model"][name]) for name, value in ckpts[0]["model"].items())


def test_every_env_of_every_rank_has_its_own_seed(workdir):
    printing = ["--env-id", "tests.mpi_ranks:PendulumPrintsSeeds-v0", *PENDULUM[2:-4], "--total-timesteps", "256"]
    result = mpirun(2, str(REPO / "ppo_mpi.py"), *printing, "--eval-episodes", "0", cwd=workdir)
    assert result.returncode == 0, result.stderr
    seeds = re.findall(r"reset seed (\d+);", result.stdout)
    assert len(seeds) == 4 and len(set(seeds)) == 4, f"2 ranks x 2 envs reset with the seeds {seeds}"


def test_an_error_on_one_rank_ends_them_all(workdir):
    result = mpirun(2, str(REPO / "ppo_mpi.py"), "--num-envs", "0", cwd=workdir, timeout=60)
    assert result.returncode == 2 and result.stderr.count("error: --num-envs 0 must be positive") == 1, result.stderr
    # rank 1's env raises after 300 steps, during training: rank 0 would wait for it in the next Allreduce for ever
    crash = ["--env-id", "tests.mpi_ranks:PendulumCrashOnRank1-v0", *PENDULUM[2:-4], "--total-timesteps", "4096"]
    result = mpirun(2, str(REPO / "ppo_mpi.py"), *crash, cwd=workdir, timeout=60)
    assert result.returncode != 0 and "CrashOnRank1: the env broke on rank 1" in result.stderr, result.stderr


ONE_RANK = [("ppo_mpi.py", "ppo_continuous.py", PENDULUM[:-4]), ("ppo_atari_mpi.py", "ppo_atari.py", BREAKOUT[:-4])]


@pytest.mark.parametrize("script, parent, flags", ONE_RANK)
def test_one_rank_takes_its_parents_steps(workdir, script, parent, flags):
    """On one rank the averaged gradient is the rank's own, so the script trains as its parent does, step for step (the
    check that caught the Allreduce's copy handing channels-last weights their gradients in another layout)."""
    models = []
    for name in (script, parent):
        args = [*flags, "--total-timesteps", "128", "--eval-episodes", "0", "--exp-name", name[:-3]]
        result = run_in_process(name, *args, cwd=workdir)
        assert result.returncode == 0, result.stderr
        (run_dir,) = (workdir / "runs").glob(f"*__{name[:-3]}__*")
        models.append(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    for name, value in models[0].items():
        torch.testing.assert_close(value, models[1][name], msg=f"{script} and {parent} differ in {name}")
