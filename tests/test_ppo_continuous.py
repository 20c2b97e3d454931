"""ppo_continuous.py: what it adds to ppo.py (Gaussian policy, running normalisation) by hand, then the script as a
user runs it (smoke, errors, seeding, learning, normalisation statistics that travel in the checkpoint). The helpers
it shares with ppo.py are tested in test_ppo.py; here it is checked that they are still ppo.py's."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_continuous as pc
import tests.toy_envs  # noqa: F401  (registers the toy envs in this process too)
from tests.conftest import only_run_dir, read_scalars, run_in_process, run_script


def test_backend_choice_follows_its_measured_constant():
    assert pc.choose_backend("HalfCheetah-v4", 1, "auto") == "gymnasium"  # one env: gymnasium's is faster
    assert pc.choose_backend("HalfCheetah-v4", pc.ENVPOOL_MIN_ENVS, "auto") == "envpool"
    assert pc.choose_backend("CheetahRun-v1", 1, "auto") == "envpool"  # dm_control: only envpool has it
    assert pc.choose_backend("tests.toy_envs:BoxActionToy-v0", 64, "auto") == "gymnasium"


# ---------------------------------------------------------------- running statistics


def test_running_mean_std_merges_batches_like_numpy():
    rng = np.random.default_rng(0)
    rms = pc.RunningMeanStd((2, 3))
    batches = [rng.normal(5.0, 3.0, (n, 2, 3)) for n in (1, 7, 0, 1, 64, 3)]  # one empty batch: changes nothing
    for batch in batches:
        rms.update(batch)
    data = np.concatenate(batches)
    assert rms.count == pytest.approx(len(data) + 1e-4)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-5)

    # merging two running statistics gives those of the union
    a, b = pc.RunningMeanStd(), pc.RunningMeanStd()
    a.update(data[:20, 0, 0])
    b.update(data[20:, 0, 0])
    a.merge(b.mean, b.var, b.count)
    np.testing.assert_allclose([a.mean, a.var], [data[:, 0, 0].mean(), data[:, 0, 0].var()], rtol=1e-5)


def test_obs_normalizer_normalises_clips_and_freezes():
    rng = np.random.default_rng(0)
    norm = pc.ObsNormalizer((3,))
    for _ in range(50):
        norm(rng.normal([1.0, -2.0, 100.0], [0.5, 2.0, 10.0], (4, 3)))
    mean, var, count = norm.mean.copy(), norm.var.copy(), norm.count
    obs = np.array([[1.5, -2.0, 100.0], [1.0, 1e6, 0.0]])
    out = norm(obs, update=False)
    assert out.dtype == np.float32
    expected = np.clip((obs - mean) / np.sqrt(var + 1e-8), -10, 10)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert out[1, 1] == 10.0 and out[1, 2] == -10.0  # clipped to +-10
    assert norm.count == count and np.array_equal(norm.mean, mean) and np.array_equal(norm.var, var)  # frozen
    norm(obs)
    assert norm.count == count + 2  # not frozen: every observation counts


def test_return_scaler_restarts_at_episode_boundaries_and_skips_reset_steps():
    gamma = 0.9
    scaler = pc.ReturnScaler(2, gamma)
    # env 0: an episode of rewards 1, 2 ends at step 1; step 2 is its reset step (envpool could report a reward
    # there: it must count nowhere); its next episode starts at step 3. env 1: one long episode.
    rewards = np.array([[1.0, 3.0], [2.0, 1.0], [50.0, 2.0], [4.0, 0.5]])
    resets = np.array([[False, False], [False, False], [True, False], [False, False]])
    for reward, reset in zip(rewards, resets):
        scaled = scaler(reward, reset)
    expected_returns = [
        1.0,
        3.0,
        2.0 + gamma * 1.0,
        1.0 + gamma * 3.0,
        2.0 + gamma * (1.0 + gamma * 3.0),  # step 2: env 0 is left out, env 1 goes on
        4.0,  # env 0 starts again from 0
        0.5 + gamma * (2.0 + gamma * (1.0 + gamma * 3.0)),
    ]
    assert scaler.count == pytest.approx(len(expected_returns) + 1e-4)
    np.testing.assert_allclose(scaler.returns, [4.0, expected_returns[-1]])
    np.testing.assert_allclose(scaled, rewards[-1] / np.sqrt(np.var(expected_returns) + 1e-8), rtol=1e-3)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaler.var, np.var(expected_returns), rtol=1e-3)

    steady = pc.ReturnScaler(1, gamma)
    for _ in range(1000):
        steady(np.array([0.01]), np.array([False]))  # a return of 0.1 with a tiny std
    assert steady(np.array([1.0]), np.array([False])) == 10.0  # ~30 std: clipped to 10


def test_statistics_survive_a_weights_only_checkpoint(tmp_path):
    norm = pc.ObsNormalizer((2, 2))
    norm(np.arange(24.0).reshape(6, 2, 2))
    scaler = pc.ReturnScaler(1, 0.99)
    scaler(np.array([3.0]), np.array([False]))
    path = str(tmp_path / "checkpoint.pt")
    pc.save_checkpoint(path, {"obs_rms": norm.state_dict(), "return_rms": scaler.state_dict()})
    loaded = torch.load(path, weights_only=True)
    norm2, scaler2 = pc.ObsNormalizer((2, 2)), pc.ReturnScaler(1, 0.99)
    norm2.load_state_dict(loaded["obs_rms"])
    scaler2.load_state_dict(loaded["return_rms"])
    obs = np.ones((1, 2, 2))
    np.testing.assert_array_equal(norm2(obs, update=False), norm(obs, update=False))
    assert (norm2.count, scaler2.count, scaler2.var) == (norm.count, scaler.count, scaler.var)


# ---------------------------------------------------------------- the Gaussian agent


SPACES = {
    "1-D": (gym.spaces.Box(-np.inf, np.inf, (17,)), gym.spaces.Box(-1, 1, (6,))),
    "2-D observations and actions": (gym.spaces.Box(-1, 1, (3, 2)), tests.toy_envs.BoxActionToy.action_space),
}


def make_agent(name):
    torch.manual_seed(0)
    agent = pc.Agent(*SPACES[name])
    with torch.no_grad():  # a mean far from 0 and a std far from 1, unlike the init's
        agent.actor[-1].weight.mul_(100)
        agent.actor_logstd.uniform_(-1.5, 0.5)
    return agent


@pytest.mark.parametrize("name", SPACES)
def test_numpy_policy_matches_torch(name):
    agent = make_agent(name)
    policy = pc.numpy_policy(agent, np.random.default_rng(0))
    obs = pc.encode_obs(SPACES[name][0], np.stack([SPACES[name][0].sample() for _ in range(64)]))
    action, logprob, value = policy(obs)
    _, t_logprob, t_entropy, t_value = agent.get_action_and_value(torch.from_numpy(obs), torch.from_numpy(action))
    np.testing.assert_allclose(logprob, t_logprob.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(value, t_value.detach().numpy(), rtol=1e-4, atol=1e-5)
    # both agree with torch.distributions.Normal
    with torch.no_grad():
        normal = torch.distributions.Normal(agent.actor(torch.from_numpy(obs)), agent.actor_logstd.exp())
        np.testing.assert_allclose(logprob, normal.log_prob(torch.from_numpy(action)).sum(-1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(t_entropy, normal.entropy().sum(-1), rtol=1e-5)


@pytest.mark.parametrize("sampler", ["numpy", "torch"])
def test_sampling_follows_the_gaussian(sampler):
    agent = make_agent("1-D")
    obs = np.tile(SPACES["1-D"][0].sample().astype(np.float32), (20000, 1))
    if sampler == "numpy":
        action = pc.numpy_policy(agent, np.random.default_rng(0))(obs)[0]
    else:
        action = agent.get_action_and_value(torch.from_numpy(obs))[0].detach().numpy()
    with torch.no_grad():
        mean, std = agent.actor(torch.from_numpy(obs[:1]))[0].numpy(), agent.actor_logstd.exp()[0].numpy()
    np.testing.assert_allclose(action.mean(0), mean, atol=0.04 * std.max())
    np.testing.assert_allclose(action.std(0), std, rtol=0.03)


def test_numpy_policy_matches_torch_with_gsde():
    """gSDE's NumPy rollout gives the action torch's draws with the same noise weights, and its log-probability."""
    torch.manual_seed(0)
    agent = pc.Agent(*SPACES["1-D"], gsde=True, log_std_init=-1.0)
    with torch.no_grad():
        agent.actor_logstd.uniform_(-1.5, 0.5)
    noise = agent.sample_noise(64, np.random.default_rng(1))
    obs = np.random.default_rng(2).standard_normal((64, 17), dtype=np.float32)
    action, logprob, value = pc.numpy_policy(agent, np.random.default_rng(0))(obs, noise)
    with torch.no_grad():
        t_action, t_logprob, _, t_value = agent.get_action_and_value(
            torch.from_numpy(obs), noise=torch.from_numpy(noise)
        )
    np.testing.assert_allclose(action, t_action.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logprob, t_logprob.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(value, t_value.numpy(), rtol=1e-4, atol=1e-5)


def test_gsde_head():
    """gSDE: the sampled action is the mean plus the actor's latent (the input of its last layer) times the env's
    noise weights; its log-probability and entropy are those of the Gaussian this sampling draws from (checked against
    the spread of 4000 samples of one state), the std depends on the state, and the greedy action is the mean."""
    torch.manual_seed(0)
    agent = pc.Agent(*SPACES["1-D"], gsde=True, log_std_init=-2.0)
    assert agent.actor_logstd.shape == (64, 6) and (agent.actor_logstd == -2).all()  # per (latent, action) pair
    obs = torch.randn(1, 17).expand(4000, 17)
    noise = agent.sample_noise(4000, np.random.default_rng(0))
    with torch.no_grad():
        action, logprob, entropy, _ = agent.get_action_and_value(obs, noise=torch.from_numpy(noise))
        latent, mean = agent.actor[:-1](obs), agent.actor(obs)
        torch.testing.assert_close(agent.get_action_and_value(obs, greedy=True)[0], mean)
        other_entropy = agent.get_action_and_value(torch.randn(1, 17) * 3, greedy=True)[2]
    torch.testing.assert_close(action, mean + torch.einsum("bh,bha->ba", latent, torch.from_numpy(noise)))
    std = (latent.square() @ agent.actor_logstd.detach().exp().square() + pc.SDE_EPS).sqrt()
    dist = torch.distributions.Normal(mean, std)
    torch.testing.assert_close(logprob, dist.log_prob(action).sum(-1))
    torch.testing.assert_close(entropy, dist.entropy().sum(-1))
    assert not torch.isclose(other_entropy, entropy[:1]).any()  # another state, another std
    spread = (action - mean).std(0) / std[0]
    assert ((spread - 1).abs() < 0.05).all(), spread


def test_greedy_takes_the_mean_and_the_env_gets_the_action_clipped():
    agent = make_agent("2-D observations and actions")
    space = SPACES["2-D observations and actions"][1]
    obs = torch.rand(32, 6) * 2 - 1  # 3 x 2 observations, flat as ObsPreparer gives them
    action = agent.get_action_and_value(obs, greedy=True)[0]
    assert torch.equal(action, agent.actor(obs))
    # the sample the rollout stores may leave the bounds; the env gets it reshaped and clipped
    sample = pc.numpy_policy(agent, np.random.default_rng(0))(obs.numpy())[0]
    env_action = pc.to_env_action(sample, space)
    assert env_action.shape == (32, 2, 2) and all(space.contains(a) for a in env_action)
    assert (env_action != sample.reshape(32, 2, 2)).any()
    inside = (sample.reshape(32, 2, 2) >= space.low) & (sample.reshape(32, 2, 2) <= space.high)
    np.testing.assert_array_equal(env_action[inside], sample.reshape(32, 2, 2)[inside])


def test_init_follows_cleanrl():
    agent = pc.Agent(*SPACES["1-D"])
    assert torch.equal(agent.actor_logstd, torch.zeros(1, 6))  # std 1
    assert agent.actor[-1].weight.std() < 0.01  # orthogonal with gain 0.01: the initial mean is close to 0


def test_unsupported_spaces_are_named():
    for space in (gym.spaces.Discrete(2), gym.spaces.MultiDiscrete([2, 3]), gym.spaces.MultiBinary(3)):
        with pytest.raises(pc.UserError, match="use ppo.py"):
            pc.Agent(gym.spaces.Box(-1, 1, (3,)), space)
    with pytest.raises(pc.UserError, match="observations are Text"):
        pc.Agent(gym.spaces.Dict({"a": gym.spaces.Text(3)}), gym.spaces.Box(-1, 1, (2,)))


def test_backends_give_the_same_mujoco_episode_semantics():
    """Both backends: next-step autoreset, HalfCheetah truncated (never terminated) at 1000 steps, reset reward 0."""
    for backend in ("gymnasium", "envpool"):
        envs = pc.make_envs("HalfCheetah-v4", 2, 1, backend)
        envs.reset(seed=1)
        tracker, ended, reset_rewards = pc.EpisodeTracker(2), [], []
        for _ in range(2002):
            was_reset = tracker.reset.copy()
            _, reward, terminated, truncated, _ = envs.step(np.zeros((2, 6), np.float32))
            reset_rewards += reward[was_reset].tolist()
            ended += [length for _, length in tracker.step(reward, terminated, truncated)]
            assert not terminated.any()
        envs.close()
        assert ended == [1000] * 4 and reset_rewards == [0.0] * 4, backend


# ---------------------------------------------------------------- the script, run as a user runs it

LOSS_KEYS = ["value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac", "explained_variance"]
KEYS = ["charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS"]
KEYS += [f"losses/{k}" for k in LOSS_KEYS]
PENDULUM = ["--env-id", "Pendulum-v1", "--num-steps", "256", "--num-minibatches", "4", "--update-epochs", "2"]


def test_train_log_checkpoint_eval_resume(workdir):
    result = run_in_process(
        "ppo_continuous.py", *PENDULUM, "--total-timesteps", "1024", "--save-interval", "1", "--eval-episodes", "2",
        cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    scalars = read_scalars(run_dir)
    assert set(KEYS) <= set(scalars), set(KEYS) - set(scalars)
    assert [step for step, _ in scalars["charts/SPS"]] == [256, 512, 768, 1024]
    lrs = [lr for _, lr in scalars["charts/learning_rate"]]
    np.testing.assert_allclose(lrs, [3e-4 * f for f in (1, 0.75, 0.5, 0.25)], rtol=1e-5)  # annealed per iteration
    assert [r for _, r in scalars["charts/episodic_length"]] == [200] * 5  # Pendulum: truncated at 200, real steps
    assert all(-2000 < r < 0 for _, r in scalars["charts/episodic_return"])  # real returns, not scaled rewards
    assert "done: 1,024 steps" in result.stdout and "eval Pendulum-v1:" in result.stdout

    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["script"] == "ppo_continuous.py" and ckpt["global_step"] == 1024
    assert {"model", "optimizer", "obs_rms", "return_rms"} <= ckpt.keys()
    # every observation counts (the first reset's and 1024 steps'); every step but the 5 reset steps counts
    assert ckpt["obs_rms"]["count"] == pytest.approx(1025 + 1e-4) and ckpt["obs_rms"]["mean"].shape == (3,)
    assert ckpt["return_rms"]["count"] == pytest.approx(1019 + 1e-4)

    result = run_in_process(
        "ppo_continuous.py", "--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--eval-episodes", "3", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    assert "over 3 greedy episodes" in result.stdout and "done:" not in result.stdout  # evaluated, did not train
    result = run_in_process("ppo_continuous.py", "--resume", str(run_dir / "checkpoint.pt"), cwd=workdir)
    assert result.returncode == 2 and "trained with --env-id Pendulum-v1" in result.stderr  # resuming repeats the env

    result = run_in_process(
        "ppo_continuous.py", *PENDULUM, "--total-timesteps", "1536", "--resume", str(run_dir / "checkpoint.pt"),
        "--eval-episodes", "0", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert resumed["global_step"] == 1536
    assert not torch.equal(resumed["model"]["actor.0.weight"], ckpt["model"]["actor.0.weight"])
    # the statistics went on from the checkpoint's: one more reset, 512 more steps (2 of them reset steps)
    assert resumed["obs_rms"]["count"] == pytest.approx(1025 + 513 + 1e-4)
    assert resumed["return_rms"]["count"] == pytest.approx(1019 + 510 + 1e-4)
    scalars = read_scalars(run_dir)  # the run's curves continue in the same folder
    assert [step for step, _ in scalars["charts/SPS"]][-2:] == [1280, 1536]
    np.testing.assert_allclose(
        [lr for _, lr in scalars["charts/learning_rate"]][-2:], [3e-4 * (1 - 4 / 6), 3e-4 * (1 - 5 / 6)], rtol=1e-5
    )


def test_box_actions_of_any_shape_and_bounds(workdir):
    # the toy env asserts that every action lies within its bounds: the clipped action reaches it, in its layout
    result = run_in_process(
        "ppo_continuous.py", *PENDULUM, "--env-id", "tests.toy_envs:BoxActionToy-v0", "--total-timesteps", "512",
        "--eval-episodes", "1", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert torch.load(only_run_dir(workdir) / "checkpoint.pt", weights_only=True)["global_step"] == 512


def test_recompute_adv_takes_the_trained_critic_before_each_epoch(workdir, monkeypatch):
    values_seen, compute_gae = [], pc.compute_gae
    monkeypatch.setattr(pc, "compute_gae", lambda r, v, *rest: values_seen.append(v.copy()) or compute_gae(r, v, *rest))
    flags = ["--total-timesteps", "512", "--update-epochs", "3", "--eval-episodes", "0"]
    result = run_in_process("ppo_continuous.py", *PENDULUM, *flags, "--recompute-adv", cwd=workdir)
    assert result.returncode == 0, result.stderr
    # 2 iterations of 256 steps: GAE before each of the 3 epochs of each (without the flag: once), from new values
    assert len(values_seen) == 6
    assert all(not np.allclose(a, b) for a, b in zip(values_seen, values_seen[1:]))


def test_envpool_backend_on_mujoco(workdir):
    result = run_in_process(
        "ppo_continuous.py", "--env-backend", "envpool", "--num-envs", "2", "--num-steps", "512",
        "--num-minibatches", "4", "--update-epochs", "1", "--total-timesteps", "2048", "--eval-episodes", "1",
        cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [length for _, length in read_scalars(only_run_dir(workdir))["charts/episodic_length"]] == [1000, 1000]
    assert "eval HalfCheetah-v4:" in result.stdout


def test_track_to_wandb_offline(workdir):
    result = run_script(
        "ppo_continuous.py", *PENDULUM, "--track", "--total-timesteps", "256", "--eval-episodes", "0", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    offline_runs = list((only_run_dir(workdir) / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))


def test_capture_video_of_evaluation(workdir):
    result = run_in_process(
        "ppo_continuous.py", *PENDULUM, "--capture-video", "--total-timesteps", "256", "--eval-episodes", "2",
        cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    videos = list((only_run_dir(workdir) / "videos").glob("*.mp4"))
    assert len(videos) == 2 and all(v.stat().st_size > 1000 for v in videos)


def test_mask_velocity_comes_before_normalisation(workdir):
    result = run_in_process(
        "ppo_continuous.py", *PENDULUM, "--mask-velocity", "--total-timesteps", "512", "--eval-episodes", "1",
        cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(only_run_dir(workdir) / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["mask_velocity"] is True
    # Pendulum's angular velocity (entry 2) is zeroed before the normaliser sees it: mean 0, variance ~0
    assert ckpt["obs_rms"]["mean"][2] == 0 and ckpt["obs_rms"]["var"][2] < 1e-6 < ckpt["obs_rms"]["var"][:2].min()


def test_checkpoint_of_the_other_script_is_refused(workdir):
    result = run_in_process("ppo.py", "--total-timesteps", "512", "--eval-episodes", "0", cwd=workdir)
    assert result.returncode == 0, result.stderr
    ckpt = str(only_run_dir(workdir) / "checkpoint.pt")
    result = run_in_process("ppo_continuous.py", "--eval-checkpoint", ckpt, cwd=workdir)
    assert result.returncode != 0 and "written by ppo.py" in result.stderr and "Traceback" not in result.stderr


def test_same_seed_same_run(workdir):
    returns = []
    for name in ("a", "b", "c"):
        seed = "2" if name == "c" else "1"
        result = run_in_process(
            "ppo_continuous.py", "--env-id", "Pendulum-v1", "--total-timesteps", "4096", "--seed", seed,
            "--exp-name", name, "--eval-episodes", "0", cwd=workdir,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (run_dir,) = (workdir / "runs").glob(f"*__{name}__*")
        returns.append(read_scalars(run_dir)["charts/episodic_return"])
    assert len(returns[0]) == 20 and returns[0] == returns[1]  # the second 10 follow the first update
    assert returns[0] != returns[2]


# ---------------------------------------------------------------- learning, and the statistics a checkpoint carries

# Calibration: seeds 1-8 at 50k steps (24 iterations, 49,152 steps) all reached a mean return over their last 20
# episodes of 1000 (the maximum: the pole stays up for the 1000-step limit); at 40k steps they stood at 1000, 947,
# 920, 990, 894, 978, 936, 941, at 30k at 552-670, and an untrained policy scores ~8. Greedy evaluation of seed 1's
# checkpoint: 1000 with its saved statistics, 59 with a fresh normaliser's.
LEARNING_STEPS, LEARNING_THRESHOLD = 50_000, 700


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One InvertedPendulum-v4 run, shared by the tests below: (run folder, training episodic returns)."""
    workdir = tmp_path_factory.mktemp("trained")
    result = run_in_process(
        "ppo_continuous.py", "--env-id", "InvertedPendulum-v4", "--total-timesteps", str(LEARNING_STEPS),
        "--seed", "1", "--eval-episodes", "0", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    return run_dir, [r for _, r in read_scalars(run_dir)["charts/episodic_return"]]


def test_learns_inverted_pendulum(trained):
    _, returns = trained
    assert np.mean(returns[-20:]) >= LEARNING_THRESHOLD, np.mean(returns[-20:])


def eval_return(checkpoint, workdir) -> float:
    result = run_in_process(
        "ppo_continuous.py", "--eval-checkpoint", str(checkpoint), "--eval-episodes", "5", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("eval InvertedPendulum-v4:")]
    return float(line.split(":")[1].split("±")[0])


def test_eval_checkpoint_reproduces_training_with_the_saved_statistics(trained, tmp_path):
    run_dir, returns = trained
    assert eval_return(run_dir / "checkpoint.pt", tmp_path) >= LEARNING_THRESHOLD
    # the same weights with the statistics of a fresh normaliser (as if they had not been saved) fail
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    fresh = pc.ObsNormalizer(ckpt["obs_rms"]["mean"].shape).state_dict()
    pc.save_checkpoint(str(tmp_path / "no_stats.pt"), {**ckpt, "obs_rms": fresh})
    assert eval_return(tmp_path / "no_stats.pt", tmp_path) < LEARNING_THRESHOLD / 5


def test_capture_video_of_a_mujoco_checkpoint(trained, tmp_path):
    run_dir, _ = trained
    result = run_in_process(
        "ppo_continuous.py", "--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--capture-video",
        "--eval-episodes", "1", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    videos = list((run_dir / "videos").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000


# ---------------------------------------------------------------- behaviour-cloning pretraining


def test_save_dataset_keeps_the_expert_statistics(workdir):
    result = run_in_process(
        "ppo_continuous.py", *PENDULUM, "--total-timesteps", "256", "--eval-episodes", "0", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(only_run_dir(workdir) / "checkpoint.pt", weights_only=True)
    args = ["--eval-checkpoint", str(only_run_dir(workdir) / "checkpoint.pt"), "--eval-episodes", "2"]
    assert run_in_process("ppo_continuous.py", *args, "--save-dataset", "expert.npz", cwd=workdir).returncode == 0
    with np.load(workdir / "expert.npz") as data:
        np.testing.assert_array_equal(data["obs_mean"], checkpoint["obs_rms"]["mean"].numpy())
        np.testing.assert_array_equal(data["obs_var"], checkpoint["obs_rms"]["var"].numpy())
        observations, actions = data["observations"], data["actions"]
    assert observations.shape == (400, 3) and actions.shape == (400, 1)  # two Pendulum episodes of 200 steps
    agent = pc.Agent(gym.spaces.Box(-np.inf, np.inf, (3,)), gym.spaces.Box(-2, 2, (1,)))
    agent.load_state_dict(checkpoint["model"])
    mean = agent.get_action_and_value(torch.from_numpy(observations), greedy=True)[0].detach().numpy()
    np.testing.assert_allclose(mean, actions, rtol=1e-5, atol=1e-6)  # the greedy (mean) action on what it saw


def test_behaviour_cloning_learns_the_expert_mean(workdir):
    """BoxActionToy pays minus the distance of the action from a target its observation gives: an expert that
    computes the target scores 0; the untrained policy about -59 an episode (calibration: cloned -4.0 to -4.3 over
    seeds 1-3)."""
    env, observations, actions = gym.make("tests.toy_envs:BoxActionToy-v0"), [], []
    space = env.action_space
    for episode in range(40):
        obs, _ = env.reset(seed=episode)
        for _ in range(16):
            action = (obs + 1) * (space.high - space.low) / 2 + space.low  # the target (BoxActionToy._obs, inverted)
            observations.append(obs.reshape(-1))
            actions.append(action.reshape(-1))
            obs = env.step(action)[0]
    np.savez(
        workdir / "expert.npz", script="ppo_continuous.py", env_id="tests.toy_envs:BoxActionToy-v0",
        mask_velocity=False, observations=np.array(observations), actions=np.array(actions, np.float32),
        obs_mean=np.zeros(4), obs_var=np.ones(4), obs_count=np.array(1e4),
    )  # fmt: skip
    args = ["--env-id", "tests.toy_envs:BoxActionToy-v0", "--bc-dataset", "expert.npz", "--bc-epochs", "30"]
    small = ["--num-envs", "1", "--num-steps", "64", "--num-minibatches", "2", "--total-timesteps", "64"]
    result = run_in_process("ppo_continuous.py", *args, *small, "--eval-episodes", "3", cwd=workdir)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(workdir))
    assert scalars["bc/loss"][-1][1] < scalars["bc/loss"][0][1] - 1
    assert scalars["bc/greedy_return"][0][1] > -8
    checkpoint = torch.load(only_run_dir(workdir) / "checkpoint.pt", weights_only=True)
    np.testing.assert_array_equal(checkpoint["obs_rms"]["var"].numpy() > 0.5, True)  # the expert's, then updated


def test_gsde_run_of_another_network_resamples_its_noise_and_its_checkpoint_evaluates(workdir, monkeypatch):
    calls = []
    sample_noise = pc.Agent.sample_noise
    monkeypatch.setattr(pc.Agent, "sample_noise", lambda self, n, rng: calls.append(n) or sample_noise(self, n, rng))
    gsde = ["--gsde", "--sde-sample-freq", "16", "--log-std-init", "-1"]
    args = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2", *gsde]
    args += ["--hidden-size", "32", "--activation", "relu"]
    result = run_in_process("ppo_continuous.py", *args, "--total-timesteps", "256", "--eval-episodes", "0", cwd=workdir)
    assert result.returncode == 0, result.stderr  # the guard held: a first-minibatch ratio of 1
    # once for the rollout's probe, then at steps 0, 16, 32, 48 of each of the 2 rollouts, for the 2 envs
    assert calls == [64] + [2] * 8
    checkpoint = only_run_dir(workdir) / "checkpoint.pt"
    model = torch.load(checkpoint, weights_only=True)["model"]
    assert model["actor_logstd"].shape == (32, 1) and model["critic.2.weight"].shape == (32, 32)
    built, init = [], pc.Agent.__init__  # each Agent --eval-checkpoint builds, however its arguments are passed
    monkeypatch.setattr(pc.Agent, "__init__", lambda self, *a, **k: init(self, *a, **k) or built.append(self))
    result = run_in_process(
        "ppo_continuous.py", "--eval-checkpoint", str(checkpoint), "--eval-episodes", "1", cwd=workdir
    )
    assert result.returncode == 0 and "over 1 greedy episodes" in result.stdout, result.stderr  # its network, built
    assert len(built) == 1 and {type(m) for m in built[0].actor} == {torch.nn.Linear, torch.nn.ReLU}  # relu, as trained
    result = run_in_process("ppo_continuous.py", *args[:8], "--resume", str(checkpoint), cwd=workdir)
    assert result.returncode == 2 and "trained with --gsde True" in result.stderr
    result = run_in_process("ppo_continuous.py", *args[:13], "--resume", str(checkpoint), cwd=workdir)
    assert result.returncode == 2 and "trained with --hidden-size 32" in result.stderr
    result = run_in_process("ppo_continuous.py", *args[:15], "--resume", str(checkpoint), cwd=workdir)
    assert result.returncode == 2 and "trained with --activation relu" in result.stderr
