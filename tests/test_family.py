"""Every script of the family, as a user runs it, in three tables: a few iterations on its smallest task (logging keys,
checkpoint, --eval-checkpoint, --resume), the first minibatch's ratio check, and learning a task in seconds. In this
process (tests/conftest.py: run_in_process); the MPI scripts on one rank (test_ppo_mpi.py runs two; ppo_pbt.py's
population has its own test, test_ppo_pbt.py)."""

import numpy as np
import pytest
import torch

import tests.toy_envs  # noqa: F401  registers the toy envs in this process
from tests.conftest import REPO, edited_copy, only_run_dir, read_scalars, run_in_process

SMALL = ["--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "1"]  # a batch of 64
SEQUENCES = [*SMALL, "--seq-len", "16"]
FAMILY = {  # script: its smallest task
    "ppo.py": ["--env-id", "CartPole-v1", *SMALL],
    "ppo_masked.py": ["--env-id", "tests.toy_envs:MaskedDictToy-v0", *SMALL],
    "ppo_bc.py": ["--env-id", "CartPole-v1", "--expert", "expert.pt", "--expert-episodes", "2", *SMALL],
    "ppo_lstm.py": ["--env-id", "Pendulum-v1", *SEQUENCES],
    "ppo_lstm_masked.py": ["--env-id", "tests.toy_envs:MaskedToy-v0", *SEQUENCES],
    "ppo_continuous.py": ["--env-id", "Pendulum-v1", *SMALL],
    "ppo_gsde.py": ["--env-id", "Pendulum-v1", *SMALL],
    "ppo_mpi.py": ["--env-id", "Pendulum-v1", *SMALL],
    "ppo_atari.py": ["--env-id", "Breakout-v5", *SMALL],
    "ppo_atari_mpi.py": ["--env-id", "Breakout-v5", *SMALL],
}
# ppo_pbt.py as a population of one (its --update-epochs is a range: low high); test_ppo_pbt.py runs its populations
WITH_PBT = {**FAMILY, "ppo_pbt.py": ["--env-id", "CartPole-v1", *SMALL[:-1], "1", "1"]}
KEYS = {"charts/learning_rate", "charts/SPS", "losses/explained_variance"}
KEYS |= {f"losses/{k}" for k in ("value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac")}


def small_run(script, workdir, *flags, steps=128, module=None):
    """The script (or module, its edited copy) on its smallest task for steps steps."""
    if script == "ppo_bc.py" and not (workdir / "expert.pt").exists():  # a ppo.py checkpoint to clone
        expert = run_in_process("ppo.py", *FAMILY["ppo.py"], "--total-timesteps", "64", "--exp-name", "x", cwd=workdir)
        assert expert.returncode == 0, expert.stderr
        (next((workdir / "runs").glob("*__x__*")) / "checkpoint.pt").rename(workdir / "expert.pt")
    return run_in_process(module or script, *WITH_PBT[script], "--total-timesteps", str(steps), *flags, cwd=workdir)


@pytest.mark.parametrize("script", FAMILY)
def test_train_log_checkpoint_eval_resume(workdir, script):
    result = small_run(script, workdir, "--save-interval", "1", "--eval-episodes", "1", "--exp-name", "run")
    assert result.returncode == 0 and "over 1 greedy episodes" in result.stdout, result.stderr
    (run_dir,) = (workdir / "runs").glob("*__run__*")
    scalars = read_scalars(run_dir)
    assert KEYS <= scalars.keys(), KEYS - scalars.keys()  # CleanRL's keys
    assert [step for step, _ in scalars["charts/SPS"]] == [64, 128]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["script"] == script and ckpt["global_step"] == 128 and {"model", "optimizer", "args"} <= ckpt.keys()

    result = run_in_process(script, "--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--eval-episodes", "2",
                            cwd=workdir)  # fmt: skip
    assert result.returncode == 0 and "over 2 greedy episodes" in result.stdout, result.stderr
    assert "done:" not in result.stdout  # evaluated, did not train

    resume = ["--resume", str(run_dir / "checkpoint.pt"), "--eval-episodes", "0"]
    result = small_run(script, workdir, *resume, steps=192)
    assert result.returncode == 0, result.stderr
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert resumed["global_step"] == 192 and resumed["args"]["total_timesteps"] == 192
    assert any(not torch.equal(resumed["model"][k], ckpt["model"][k]) for k in ckpt["model"])  # it trained on
    scalars = read_scalars(run_dir)  # the curves go on in the same folder, the lr schedule where it stopped
    assert [step for step, _ in scalars["charts/SPS"]] == [64, 128, 192]
    lrs = [lr for _, lr in scalars["charts/learning_rate"]]
    np.testing.assert_allclose(lrs, [lrs[0], lrs[0] / 2, lrs[0] / 3], rtol=1e-5)  # iterations 1, 2 of 2; 3 of 3
    assert small_run(script, workdir, *resume, steps=192).returncode == 2  # nothing left to train


@pytest.mark.parametrize("script", WITH_PBT)
def test_a_random_network_is_caught_by_the_first_minibatch_ratio(workdir, script):
    """Dropout makes the update compute another policy than the rollout sampled from: the check that the first
    minibatch's ratio is 1 stops the run (and every run of the table above passed it)."""
    source = (REPO / script).read_text()
    activation = next(name for name in ("nn.Tanh()", "Activation()", "nn.ReLU()") if name in source)
    module = edited_copy(script, [(activation, f"nn.Sequential({activation}, nn.Dropout(0.5))")], workdir)
    result = small_run(script, workdir, module=module)
    assert result.returncode == 1 and "first minibatch's ratio is not 1" in result.stderr, result.stderr


# Calibration, each over seeds 1-5 or more (the test runs seed 1); "last" is the mean return of the last N episodes.
# ppo.py, CartPole-v1 100k, last 20: 283, 252, 250, 367, 231, 260, 269, 303 (untrained ~22).
# ppo_continuous.py and ppo_gsde.py, InvertedPendulum-v4 25,600 steps of 512 x 1 env, last 20 (untrained < 10, at
# most 1000): 871, 881, 929, 905 and 744, 532, 791, 844.
# ppo_masked.py, MaskedToy (16 steps an episode paying the fraction of its 2 components right) 10k, last 20: 13.4,
# 13.1, 12.3, 12.1, 12.8 (the first 20, untrained and masked, ~8.4).
# ppo_lstm.py, CueRecallToy (recall a cue shown 6 steps before) 20k, last 100: 1.00, 1.00, 1.00, -0.12, 1.00 (greedy
# 1.00 but seed 4's 0.40). A policy without memory is right half the time: expected return 0.
# ppo_lstm_masked.py, MaskedCueRecall (benchmark/masked_tasks.py: name one of 4 cues shown 8 steps before, answers
# allowed only when asked) 30k, last 100: -0.04, 0.96, 1.00, 0.02, 1.00. No policy without memory does better than
# -0.5 (ppo_masked.py: -0.51 ± 0.02 at 50k), one that answers before it is asked scores -1.
PENDULUM = ["--env-id", "InvertedPendulum-v4", "--num-steps", "512", "--num-minibatches", "8", "--total-timesteps"]
LEARNING = [  # script, flags, the last N episodes, threshold of their mean return
    ("ppo.py", ["--total-timesteps", "100000"], 20, 150),
    ("ppo_continuous.py", [*PENDULUM, "25600"], 20, 500),
    ("ppo_gsde.py", [*PENDULUM, "25600"], 20, 300),
    ("ppo_masked.py", ["--env-id", "tests.toy_envs:MaskedToy-v0", "--total-timesteps", "10240", "--learning-rate",
                       "3e-3", "--num-steps", "32"], 20, 10.5),
    ("ppo_lstm.py", ["--env-id", "tests.toy_envs:CueRecallToy-v0", "--total-timesteps", "20000"], 100, 0.7),
    ("ppo_lstm_masked.py", ["--env-id", "benchmark.masked_tasks:MaskedCueRecall-v0", "--total-timesteps", "30000",
                            "--gae-lambda", "0.95", "--gamma", "0.99"], 100, -0.3),
]  # fmt: skip


@pytest.mark.parametrize("script, flags, last, threshold", LEARNING, ids=[row[0] for row in LEARNING])
def test_learns(workdir, script, flags, last, threshold):
    evaluate = ["--eval-episodes", "20" if script == "ppo_lstm.py" else "0"]
    result = run_in_process(script, *flags, "--seed", "1", *evaluate, cwd=workdir)
    assert result.returncode == 0, result.stderr
    returns = [r for _, r in read_scalars(only_run_dir(workdir))["charts/episodic_return"]]
    assert np.mean(returns[-last:]) > threshold, np.mean(returns[-last:])
    if script == "ppo_lstm.py":  # the greedy evaluation carries the state through each episode, restarts it at the next
        assert float(result.stdout.split("CueRecallToy-v0: ")[1].split()[0]) >= 0.9, result.stdout
