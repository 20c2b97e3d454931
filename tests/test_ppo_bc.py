"""ppo_bc.py: the actor clones a ppo.py expert's greedy episodes before PPO trains on."""

import torch

from tests.conftest import read_scalars, run_in_process


def test_cloning_starts_ppo_near_the_expert(workdir):
    """A ppo.py expert of 50k steps plays 400-500 greedily; its clone, before any PPO update, plays near it (an
    untrained actor: ~10). Calibration, seeds 1-3 (expert and clone): experts 408, 459, 489 over 10 greedy episodes,
    clones' accuracy 0.981, 0.980, 0.999 and greedy return 417, 500, 497 over 5."""
    expert = run_in_process("ppo.py", "--total-timesteps", "50000", "--exp-name", "expert", cwd=workdir)
    assert expert.returncode == 0, expert.stderr
    (expert_dir,) = (workdir / "runs").iterdir()
    args = ["--expert", str(expert_dir / "checkpoint.pt"), "--total-timesteps", "512", "--eval-episodes", "5"]
    result = run_in_process("ppo_bc.py", *args, "--exp-name", "clone", cwd=workdir)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (workdir / "runs").glob("*__clone__*")
    scalars = read_scalars(run_dir)
    assert [step for step, _ in scalars["bc/loss"]] == list(range(1, 11))
    assert scalars["bc/loss"][-1][1] < scalars["bc/loss"][0][1] and scalars["bc/accuracy"][-1][1] > 0.9
    assert scalars["bc/greedy_return"][0][1] >= 300
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["script"] == "ppo_bc.py"
