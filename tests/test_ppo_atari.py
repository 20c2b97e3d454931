"""ppo_atari.py: the network's shapes, the envs' preprocessing and the real game score checked against envpool by hand,
then the script as a user runs it (two games, checkpoints, videos, errors, seeding). Learning Atari takes hours of
CPU, so it is benchmarked (README), not tested: the smoke runs here check that the script trains, not that it learns."""

import re

import envpool
import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_atari
from tests.conftest import only_run_dir, read_scalars, run_in_process, run_script

# ---------------------------------------------------------------- the network


@pytest.mark.parametrize("shape, conv_size", [((4, 84, 84), 64 * 7 * 7), ((2, 64, 48), 64 * 4 * 2)])
def test_cnn_sizes_follow_the_observation_space(shape, conv_size):
    # 64: (64 - 8) // 4 + 1 = 15, (15 - 4) // 2 + 1 = 6, 6 - 3 + 1 = 4; 48: 11, 4, 2
    agent = ppo_atari.Agent(gym.spaces.Box(0, 255, shape, np.uint8), gym.spaces.Discrete(6))
    assert agent.network[0].in_channels == shape[0]
    assert agent.network[-2].in_features == conv_size
    x = torch.randint(0, 256, (5, *shape), dtype=torch.uint8)
    action, logprob, entropy, value = agent.get_action_and_value(x)
    assert action.shape == logprob.shape == entropy.shape == value.shape == (5,) and action.max() < 6
    with pytest.raises(ppo_atari.UserError, match="36x36"):
        ppo_atari.Agent(gym.spaces.Box(0, 255, (4, 30, 30), np.uint8), gym.spaces.Discrete(6))


def test_frames_are_scaled_inside_the_network():
    agent = ppo_atari.Agent(gym.spaces.Box(0, 255, (4, 84, 84), np.uint8), gym.spaces.Discrete(4))
    x = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    torch.testing.assert_close(agent.features(x), agent.network(x.float() / 255))
    logp = agent.actor(agent.features(x)).log_softmax(-1)
    greedy = agent.get_action_and_value(x, greedy=True)
    assert torch.equal(greedy[0], logp.argmax(-1))
    torch.testing.assert_close(greedy[1], logp.max(-1).values)


def test_bf16_trunk_stays_close_and_replays_exactly():
    """--bf16: the trunk in bfloat16, the heads in float32. The update recomputes the rollout's log-probabilities (a
    batch of 4 envs in the rollout, minibatches of 64 in the update) exactly on some CPUs and within bfloat16's
    rounding on others (another kernel per batch size): well inside the guard's bf16 tolerance, so the ratio is 1."""
    space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    torch.manual_seed(0)
    agent = ppo_atari.Agent(space, gym.spaces.Discrete(4), bf16=True)
    with torch.no_grad():
        agent.actor.weight.mul_(100)  # a policy far from uniform, whose log-probabilities differ a lot
    x = torch.randint(0, 256, (64, 4, 84, 84), dtype=torch.uint8)
    with torch.inference_mode():
        rollout = [agent.get_action_and_value(chunk) for chunk in x.split(4)]
    action, logprob = torch.cat([r[0] for r in rollout]), torch.cat([r[1] for r in rollout])
    _, newlogprob, entropy, value = agent.get_action_and_value(x, action)
    assert newlogprob.dtype == value.dtype == torch.float32 and logprob.std() > 0.1
    assert (newlogprob - logprob).abs().max() < ppo_atari.BF16_ROLLOUT_TOLERANCE / 10
    value_rollout = torch.cat([r[3] for r in rollout])
    assert not ppo_atari.rollout_mismatch(newlogprob, logprob, value, value_rollout, ppo_atari.BF16_ROLLOUT_TOLERANCE)
    agent.bf16 = False
    _, logprob32, _, value32 = agent.get_action_and_value(x, action)
    torch.testing.assert_close(newlogprob, logprob32, atol=0.05, rtol=0)
    torch.testing.assert_close(value, value32, atol=0.05, rtol=0)


# ---------------------------------------------------------------- the envs and the game statistics


def make_pair(monkeypatch, env_id, num_envs, seed, **changes):
    """make_envs' envs, and a twin made with the same options but `changes`: the same games, seen differently."""
    made = {}
    make = envpool.make

    def recording_make(task_id, **kwargs):
        made.update(kwargs)
        return make(task_id, **kwargs)

    monkeypatch.setattr(envpool, "make", recording_make)
    envs = ppo_atari.make_envs(env_id, num_envs, seed)
    monkeypatch.undo()
    return envs, envpool.make(env_id, **(made | changes))


def test_game_score_is_the_unclipped_score_over_all_lives(monkeypatch):
    """SpaceInvaders scores 5 to 30 points per invader, over 3 lives. The logged return of a game must be the sum of
    the rewards of an unclipped twin env (same seed, same actions), from its start to its last life."""
    envs, twin = make_pair(monkeypatch, "SpaceInvaders-v5", 2, 3, reward_clip=False)
    envs.reset(), twin.reset()
    games, logged = ppo_atari.EpisodeTracker(2), []
    by_hand, score, steps, lives_lost = [], np.zeros(2), np.zeros(2, int), np.zeros(2, int)
    rng = np.random.default_rng(0)
    while len(by_hand) < 4:
        action = rng.integers(envs.single_action_space.n, size=2)
        _, clipped, _, truncated, info = envs.step(action)
        _, reward, twin_terminated, _, twin_info = twin.step(action)
        assert set(np.unique(clipped)) <= {0.0, 1.0}  # training sees clipped rewards
        logged += ppo_atari.track_games(games, info, truncated)
        score, steps = score + reward, steps + 1
        lives_lost += twin_terminated & (twin_info["lives"] > 0)
        over = twin_terminated & (twin_info["lives"] == 0)  # the last life is lost: the game is over
        for env in np.flatnonzero(over):
            # its length: every step of the game, the reset step after each lost life included; envpool counts the
            # steps that played (elapsed_step), without those reset steps
            assert steps[env] == twin_info["elapsed_step"][env] + lives_lost[env]
            by_hand.append((score[env], steps[env]))
        score, steps, lives_lost = score * ~over, steps * ~over, lives_lost * ~over
        steps -= over  # the next step only resets the env: it belongs to no game
    assert logged == by_hand[: len(logged)] and len(logged) >= 4
    assert max(r for r, _ in logged) > 100  # far above what clipped rewards could sum to in these games


def test_fire_on_reset_and_time_limit_truncates(monkeypatch):
    """Breakout waits for FIRE at the start of each life: with fire on reset, an agent that never fires still loses
    its lives. A game cut by the time limit is truncated, not terminated (its value is bootstrapped)."""
    envs, short = make_pair(monkeypatch, "Breakout-v5", 1, 1, max_episode_steps=50)
    envs.reset()
    noop = np.zeros(1, np.int64)
    lives = [int(envs.step(noop)[4]["lives"][0]) for _ in range(500)]
    assert lives[0] == 5 and min(lives) < 4  # the ball was launched without a FIRE action: lives were lost
    short.reset()
    for step in range(1, 60):
        _, _, terminated, truncated, info = short.step(noop)
        assert truncated[0] == (info["elapsed_step"][0] == 50)
        if truncated[0]:
            assert not terminated[0] and not info["terminated"][0]
            break
    assert truncated[0]


# ---------------------------------------------------------------- the script, run as a user runs it

KEYS = ["charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS"]
KEYS += [f"losses/{k}" for k in ("value_loss", "policy_loss", "entropy", "approx_kl", "clipfrac", "explained_variance")]
SMALL = ["--num-envs", "4", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1"]


def test_train_log_checkpoint_video_eval_resume(workdir):
    result = run_in_process(
        "ppo_atari.py", "--total-timesteps", "1024", "--eval-episodes", "2", "--capture-video", *SMALL, cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    scalars = read_scalars(run_dir)
    assert set(KEYS) <= set(scalars), set(KEYS) - set(scalars)
    assert [step for step, _ in scalars["charts/SPS"]] == [256, 512, 768, 1024]
    assert "done: 1,024 steps" in result.stdout and "eval Breakout-v5:" in result.stdout
    videos = sorted((run_dir / "videos").glob("*.mp4"))
    assert len(videos) == 2 and all(v.stat().st_size > 1000 for v in videos)
    import imageio

    reader = imageio.get_reader(videos[0])
    assert reader.get_data(0).shape == (210, 160, 3) and reader.count_frames() > 20  # the full-colour screen

    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["script"] == "ppo_atari.py" and ckpt["global_step"] == 1024 and ckpt["args"]["env_id"] == "Breakout-v5"
    result = run_in_process(
        "ppo_atari.py", "--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--eval-episodes", "1", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    assert "over 1 greedy games" in result.stdout and "done:" not in result.stdout

    result = run_in_process(
        "ppo_atari.py",
        "--total-timesteps",
        "1280",
        "--resume",
        str(run_dir / "checkpoint.pt"),
        "--eval-episodes",
        "0",
        *SMALL,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert resumed["global_step"] == 1280
    assert not torch.equal(resumed["model"]["actor.weight"], ckpt["model"]["actor.weight"])
    assert [step for step, _ in read_scalars(run_dir)["charts/SPS"]][-2:] == [1024, 1280]


def test_pong_tracked_to_wandb(workdir):
    result = run_script(
        "ppo_atari.py",
        "--env-id",
        "Pong-v5",
        "--track",
        "--total-timesteps",
        "256",
        "--eval-episodes",
        "0",
        *SMALL,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]["actor.weight"].shape == (6, 512)
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))


def test_same_seed_same_run(workdir):
    runs = []
    for name in ("a", "b"):
        result = run_in_process(
            "ppo_atari.py", "--total-timesteps", "768", "--exp-name", name, "--eval-episodes", "0", *SMALL, cwd=workdir
        )
        assert result.returncode == 0, result.stderr
        (run_dir,) = (workdir / "runs").glob(f"*__{name}__*")
        runs.append((read_scalars(run_dir)["charts/episodic_return"], torch.load(run_dir / "checkpoint.pt")["model"]))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) >= 2
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@pytest.mark.parametrize(
    "env_id, message",
    [
        ("CartPole-v1", "not an Atari game: use ppo.py (discrete actions) or ppo_continuous.py"),
        ("HalfCheetah-v4", "use ppo.py (discrete actions) or ppo_continuous.py"),
        ("Breakout-v4", "did you mean Breakout-v5?"),
        ("ALE/Pong-v5", "did you mean Pong-v5?"),
        ("NoSuchGame", "e.g. Breakout-v5"),
    ],
)
def test_non_atari_ids_are_named(env_id, message):
    with pytest.raises(ppo_atari.UserError, match=re.escape(message)):
        ppo_atari.check_atari_id(env_id)
