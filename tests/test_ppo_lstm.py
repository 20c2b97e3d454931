"""ppo_lstm.py: the sequence replay by hand, the rollout's log-probabilities replayed exactly, then the script as a user
runs it (every observation and action space, MuJoCo, Atari, errors, seeding) and learning a task that needs memory."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_lstm
import tests.toy_envs  # registers the toy envs in this process too
from tests.conftest import only_run_dir, read_scalars, run_in_process, run_script

# ---------------------------------------------------------------- sequence replay


def test_sequence_segments_by_hand():
    # 2 envs, 5 steps; env 0 starts an episode at t = 2, env 1 at t = 0 and t = 3
    starts = np.array([[0, 1], [0, 0], [1, 0], [0, 1], [0, 0]], bool)
    pad_inds, unpad, seg_env, resume = ppo_lstm.sequence_segments(starts)
    # segments, env-major: env 0 t 0-1 (goes on from the stored state), env 0 t 2-4, env 1 t 0-2, env 1 t 3-4
    assert seg_env.tolist() == [0, 0, 1, 1]
    assert resume.tolist() == [True, False, False, False]
    assert pad_inds.shape == (3, 4)  # the longest segment has 3 steps
    t_b = [[(0, 0), (2, 0), (0, 1), (3, 1)], [(1, 0), (3, 0), (1, 1), (4, 1)], [None, (4, 0), (2, 1), None]]
    for position, row in enumerate(t_b):
        for segment, step in enumerate(row):
            if step is not None:
                t, b = step
                assert pad_inds[position, segment] == t * 2 + b
                assert unpad[t * 2 + b] == position * 4 + segment
    assert len(set(unpad.tolist())) == len(unpad)  # each step has its own slot


def make_agent(obs_space, act_space, hidden=16, layers=2, seed=0, gsde=False):
    torch.manual_seed(seed)
    agent = ppo_lstm.Agent(obs_space, act_space, hidden, layers, gsde)
    with torch.no_grad():  # larger output weights than the init's, so that the distributions are far from uniform
        agent.actor.weight.normal_(0, 5)
    return agent


def test_replay_matches_the_lstm_run_episode_by_episode():
    """Replaying sequences in one padded batch gives what nn.LSTM gives when run over each episode on its own, the
    first from the stored state and every later one from zeros; so does stepping one observation at a time."""
    num_steps, num_envs, layers, hidden = 12, 3, 2, 16
    agent = make_agent(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), hidden, layers)
    obs = torch.randn(num_steps, num_envs, 4)
    starts = torch.zeros(num_steps, num_envs, dtype=torch.bool)
    starts[[3, 7], 0] = True
    starts[0, 1] = True  # an episode begins with the sequence: the stored state must not be used
    starts[[1, 2, 11], 2] = True  # a one-step episode, and one on the last step
    state = [torch.randn(layers, num_envs, hidden) for _ in range(2)]

    with torch.no_grad():
        replayed, _ = agent.get_states(obs.view(-1, 4), state, starts.view(-1))
        replayed = replayed.view(num_steps, num_envs, hidden)
        expected = torch.zeros_like(replayed)
        for b in range(num_envs):
            bounds = [0, *[t for t in range(1, num_steps) if starts[t, b]], num_steps]
            for begin, end in zip(bounds[:-1], bounds[1:]):
                fresh = begin > 0 or starts[0, b]
                h0 = [torch.zeros(layers, 1, hidden) if fresh else s[:, b : b + 1] for s in state]
                out, _ = agent.lstm(agent.encode(obs[begin:end, b]).unsqueeze(1), tuple(h0))
                expected[begin:end, b] = out[:, 0]
        stepped, lstm_state = [], state
        for t in range(num_steps):
            out, lstm_state = agent.get_states(obs[t], lstm_state, starts[t])
            stepped.append(out)
    torch.testing.assert_close(replayed, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(stepped), expected, rtol=1e-5, atol=1e-6)


def rollouts(agent, envs, num_steps, iterations, seed):
    """main's rollout loop, with the same storage and state bookkeeping; returns the last rollout's batch as main
    builds it, with the LSTM state before each step."""
    prepare = ppo_lstm.ObsPreparer(envs.single_observation_space, ppo_lstm.Args(), envs.single_action_space)
    next_obs = prepare(*envs.reset(seed=seed))
    obs = np.zeros((num_steps, *next_obs.shape), dtype=next_obs.dtype)
    logprobs, values = (
        np.zeros((num_steps, envs.num_envs), np.float32),
        np.zeros((num_steps, envs.num_envs), np.float32),
    )
    resets = np.zeros((num_steps, envs.num_envs), bool)
    starts = np.zeros_like(resets)
    rng, cpu = np.random.default_rng(seed), torch.device("cpu")
    tracker = ppo_lstm.EpisodeTracker(envs.num_envs)
    policy = ppo_lstm.numpy_policy(agent, rng) or ppo_lstm.torch_policy(agent, cpu)  # as main's rollout_policy
    lstm_state = torch.stack(agent.initial_state(envs.num_envs)).numpy()
    lstm_states = np.zeros((num_steps, *lstm_state.shape), dtype=np.float32)
    for _ in range(iterations):
        actions = []
        for step in range(num_steps):
            obs[step] = next_obs
            starts[step], resets[step] = resets[step - 1], tracker.reset
            lstm_states[step] = lstm_state
            if agent.gsde and step % 4 == 0:  # --sde-sample-freq 4
                noise = agent.sample_noise(envs.num_envs, rng)
            action, logprobs[step], values[step], lstm_state = policy(
                obs[step], lstm_state, starts[step], noise if agent.gsde else None
            )
            actions.append(action)
            next_obs, reward, terminated, truncated, info = envs.step(
                ppo_lstm.to_env_action(actions[-1], envs.single_action_space)
            )
            next_obs = prepare(next_obs, info)
            tracker.step(reward, terminated, truncated)
    batch_size = num_steps * envs.num_envs
    batch = {
        "obs": torch.from_numpy(obs.reshape(batch_size, *obs.shape[2:])),
        "actions": torch.from_numpy(np.stack(actions).reshape(batch_size, -1)),
        "logprobs": torch.from_numpy(logprobs.reshape(-1)),
        "values": torch.from_numpy(values.reshape(-1)),
        "starts": torch.from_numpy(starts.reshape(-1)),
        "transition": torch.from_numpy(~resets.reshape(-1)),
        "lstm_states": torch.from_numpy(lstm_states),
    }
    return batch


@pytest.mark.parametrize(
    "env_id, gsde",
    [
        ("CartPole-v1", False),  # terminations, early on every ~20 steps
        ("tests.toy_envs:BoxActionToy-v0", False),  # Gaussian actions, truncated every 16 steps
        ("tests.toy_envs:BoxActionToy-v0", True),  # gSDE: the noise depends on the state
        ("tests.toy_envs:MultiDiscreteToy-v0", False),
        ("tests.toy_envs:MaskedToy-v0", False),  # an action mask that changes every step
        ("tests.toy_envs:DictImageToy-v0", False),  # Dict of an image, a vector and a Discrete entry
    ],
)
@pytest.mark.parametrize("seq_len", [40, 10])
def test_first_epoch_ratio_is_exactly_one(env_id, gsde, seq_len):
    """Replaying a rollout (the second one: its initial state is not zeros) in sequences of seq_len steps, each from
    the state stored at its first step, recomputes its log-probabilities and values: before any update, the ratio
    of every transition of a minibatch (as main builds it: the sequences of env 1, or 3 sequences at any times) is 1."""
    num_steps, num_envs = 40, 3
    envs = ppo_lstm.make_envs(env_id, num_envs, 1, "gymnasium")
    agent = make_agent(envs.single_observation_space, envs.single_action_space, gsde=gsde)
    batch = rollouts(agent, envs, num_steps, iterations=2, seed=1)
    envs.close()
    assert batch["starts"].any() and not batch["transition"].all()  # episodes begin and end inside the rollout
    assert batch["lstm_states"][0].abs().sum() > 0
    mb_seqs = torch.tensor([1]) if seq_len == num_steps else torch.tensor([1, 5, 9])  # sequences i: env i % 3
    t0, env = mb_seqs.div(num_envs, rounding_mode="floor") * seq_len, mb_seqs % num_envs
    mb_inds = ((t0 + torch.arange(seq_len)[:, None]) * num_envs + env).reshape(-1)
    _, newlogprob, _, newvalue, _ = agent.get_action_and_value(
        batch["obs"][mb_inds],
        batch["lstm_states"][t0, :, :, env].movedim(0, 2),
        batch["starts"][mb_inds],
        batch["actions"][mb_inds],
    )
    keep = batch["transition"][mb_inds]
    ratio = (newlogprob[keep] - batch["logprobs"][mb_inds][keep]).exp()
    # gSDE's log-probability takes a square root of a sum over the LSTM units: a few 1e-6 more of float32 rounding
    assert (ratio - 1).abs().max() < (5e-5 if gsde else 1e-5)
    assert batch["logprobs"][mb_inds][keep].std() > 0.05  # far from a uniform policy, so this says something
    torch.testing.assert_close(newvalue[keep], batch["values"][mb_inds][keep], rtol=1e-5, atol=1e-5)


MASKED_SPACES = [  # observations, actions, gSDE, an action mask
    (gym.spaces.Box(-1, 1, (2, 3)), gym.spaces.MultiDiscrete([3, 2]), False, False),  # flattened, ragged categorical
    (gym.spaces.Box(-1, 1, (2, 3)), gym.spaces.MultiDiscrete([3, 2]), False, True),  # with an action mask
    (gym.spaces.Discrete(5), gym.spaces.MultiBinary(3), False, False),  # one-hot
    (gym.spaces.Discrete(5), gym.spaces.Discrete(5), False, True),  # one-hot, with an action mask
    (gym.spaces.Dict({"a": gym.spaces.Box(-1, 1, (2,)), "b": gym.spaces.Discrete(3)}), gym.spaces.Discrete(4), 0, 0),
    (tests.toy_envs.MixedObsToy.observation_space, gym.spaces.Discrete(4), False, True),  # every space, nested
    (gym.spaces.Box(-1, 1, (4,)), gym.spaces.Box(-2, 2, (2,)), False, False),  # Gaussian
    (gym.spaces.Box(-1, 1, (4,)), gym.spaces.Box(-2, 2, (2,)), True, False),  # gSDE
]


@pytest.mark.parametrize("obs_space, act_space, gsde, masked", MASKED_SPACES)
def test_numpy_rollout_policy_matches_torch(obs_space, act_space, gsde, masked):
    """The rollout's NumPy policy (vector observations) gives the log-probability, value and next LSTM state that the
    torch network gives for its sampled action, through two LSTM layers and an episode start."""
    agent = make_agent(obs_space, act_space, gsde=gsde)
    noise = agent.sample_noise(8, np.random.default_rng(2)) if gsde else None
    policy = ppo_lstm.numpy_policy(agent, np.random.default_rng(0))
    prepare = ppo_lstm.ObsPreparer(obs_space, ppo_lstm.Args(), act_space)
    obs_space.seed(0)
    nvec_sum = int(ppo_lstm.action_nvec(act_space).sum()) if masked else 0
    masks = {"action_mask": np.random.default_rng(3).random((8, nvec_sum)) < 0.6} if masked else {}
    obs = prepare(gym.vector.utils.batch_space(obs_space, 8).sample(), masks)
    state = np.random.default_rng(1).standard_normal((2, 2, 8, 16)).astype(np.float32)
    starts = np.arange(8) % 3 == 0
    action, logprob, value, next_state = policy(obs, state, starts, noise)
    with torch.no_grad():
        _, t_logprob, _, t_value, t_state = agent.get_action_and_value(
            torch.from_numpy(obs), torch.from_numpy(state), torch.from_numpy(starts), torch.from_numpy(action)
        )
    np.testing.assert_allclose(logprob, t_logprob.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(value, t_value.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(next_state, torch.stack(t_state).numpy(), rtol=1e-4, atol=1e-5)
    assert logprob.std() > 0.1  # far from a uniform policy
    without_starts = policy(obs, state, np.zeros(8, dtype=bool), noise)[
        3
    ]  # the restart at starts changed those envs' state
    assert (
        np.abs(without_starts - next_state)[:, :, starts].min() > 0
        and (without_starts == next_state)[:, :, ~starts].all()
    )


# ---------------------------------------------------------------- encoders, observations, actions


def test_image_channels_first_or_last():
    first = ppo_lstm.Encoder(gym.spaces.Box(0, 255, (4, 40, 44), np.uint8))
    last = ppo_lstm.Encoder(gym.spaces.Box(0, 255, (40, 44, 4), np.uint8))
    last.load_state_dict(first.state_dict())
    images = torch.randint(0, 256, (5, 4, 40, 44), dtype=torch.uint8)
    torch.testing.assert_close(first(images), last(images.permute(0, 2, 3, 1)))
    with pytest.raises(ppo_lstm.UserError, match="36x36"):
        ppo_lstm.Encoder(gym.spaces.Box(0, 255, (3, 20, 20), np.uint8))


def test_atari_lives_end_training_episodes_and_games_are_scored_whole():
    """Breakout as main steps it: one 84x84 frame (the LSTM remembers), a training episode per life with rewards
    clipped to their sign, and the logged game (main's `games` tracker) is the real, unclipped score of all lives."""
    envs = ppo_lstm.make_envs("Breakout-v5", 2, 1, "envpool")
    assert ppo_lstm.is_atari("Breakout-v5", "envpool") and not ppo_lstm.is_atari("CartPole-v1", "envpool")
    assert envs.single_observation_space.shape == (1, 84, 84)
    envs.reset()
    lives, games, rng = ppo_lstm.EpisodeTracker(2), ppo_lstm.EpisodeTracker(2), np.random.default_rng(0)
    life_returns, game_returns, real_score, life_count = [], [], np.zeros(2), np.zeros(2, int)
    for _ in range(20000):  # until two games have ended and one of them scored
        if len(game_returns) >= 2 and sum(game_returns) > 0:
            break
        _, reward, terminated, truncated, info = envs.step(rng.integers(0, 4, 2))
        assert set(np.unique(reward)) <= {0.0, 1.0}  # clipped for training
        real_score += info["reward"]
        life_count += terminated
        life_returns += [r for r, _ in lives.step(reward, terminated, truncated)]
        for env in np.flatnonzero(info["terminated"]):
            assert life_count[env] == 5  # Breakout's five lives, each ended a training episode
            game_returns.append(real_score[env])
            real_score[env], life_count[env] = 0, 0
        assert [r for r, _ in games.step(info["reward"], info["terminated"].astype(bool), truncated)] == [
            game_returns[i] for i in range(len(game_returns) - int(info["terminated"].sum()), len(game_returns))
        ]
    envs.close()
    assert len(game_returns) >= 2 and sum(game_returns) > 0 and len(life_returns) >= 5 * len(game_returns)


def test_dict_observations_get_one_encoder_per_key():
    space = gym.make("tests.toy_envs:DictImageToy-v0").observation_space
    agent = make_agent(space, gym.spaces.Discrete(2))
    samples = [space.sample() for _ in range(4)]
    batched = {k: np.stack([s[k] for s in samples]) for k in space}
    flat = torch.from_numpy(ppo_lstm.ObsPreparer(space, ppo_lstm.Args(), gym.spaces.Discrete(2))(batched, {}))
    assert flat.dtype == torch.float32 and flat.shape == (4, 36 * 36 * 3 + 2 + 3)  # "mode" one-hot
    by_key = [e(torch.from_numpy(ppo_lstm.encode_obs(space[k], batched[k]))) for e, k in zip(agent.encoders, space)]
    torch.testing.assert_close(agent.encode(flat), torch.cat(by_key, 1))


def test_mask_velocity_zeroes_velocities():
    args = ppo_lstm.Args(env_id="CartPole-v1", mask_velocity=True)
    prepare = ppo_lstm.ObsPreparer(gym.spaces.Box(-1, 1, (4,)), args, gym.spaces.Discrete(2))
    np.testing.assert_array_equal(prepare(np.ones((2, 4), np.float32), {}), [[1, 0, 1, 0]] * 2)
    args = ppo_lstm.Args(env_id="Pendulum-v1", mask_velocity=True)
    prepare = ppo_lstm.ObsPreparer(gym.spaces.Box(-1, 1, (3,)), args, gym.spaces.Box(-2, 2, (1,)))
    np.testing.assert_array_equal(prepare(np.full((1, 3), 2, np.float32), {}), [[2, 2, 0]])


@pytest.mark.parametrize("env", ["MaskedToy", "MaskedDictToy"])  # the mask in info, or in a Dict observation
def test_an_env_action_mask_is_obeyed(workdir, env):
    """ppo.py's action masking with memory: training and evaluation never take a masked action (the guard checks that
    the replay saw the rollout's masks); with --no-action-mask they are taken."""
    args = ["--env-id", f"tests.toy_envs:{env}-v0", "--total-timesteps", "1024", "--eval-episodes", "3", *SMALL]
    tests.toy_envs.MaskedToy.violations = 0
    result = run_in_process("ppo_lstm.py", *args, cwd=workdir)
    assert result.returncode == 0 and "note:" not in result.stdout, result.stdout + result.stderr
    assert tests.toy_envs.MaskedToy.violations == 0
    result = run_in_process("ppo_lstm.py", *args, "--no-action-mask", cwd=workdir)
    assert result.returncode == 0 and tests.toy_envs.MaskedToy.violations > 50


def test_gaussian_head():
    agent = make_agent(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-2, 2, (2,)))
    obs, state, starts = torch.randn(4000, 3), agent.initial_state(4000), torch.zeros(4000, dtype=torch.bool)
    with torch.no_grad():
        action, logprob, entropy, _, _ = agent.get_action_and_value(obs, state, starts)
        mean = agent.actor(agent.get_states(obs, state, starts)[0])
        torch.testing.assert_close(agent.get_action_and_value(obs, state, starts, greedy=True)[0], mean)
    dist = torch.distributions.Normal(mean, agent.actor_logstd.exp())
    torch.testing.assert_close(logprob, dist.log_prob(action).sum(-1))
    torch.testing.assert_close(entropy, dist.entropy().sum(-1))
    assert abs((action - mean).std().item() - 1) < 0.05  # std 1 at the start
    clipped = ppo_lstm.to_env_action(action.numpy(), gym.spaces.Box(-2, 2, (2,)))
    assert clipped.min() == -2 and clipped.max() == 2  # the env gets the sample clipped to its bounds


def test_gsde_head():
    """gSDE: the sampled action is the mean plus the LSTM output times the env's noise weights; its log-probability and
    entropy are those of the Gaussian this sampling draws from (checked against the spread of 4000 samples of one
    state), and the greedy action is the mean."""
    agent = make_agent(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-2, 2, (2,)), gsde=True)
    assert agent.actor_logstd.shape == (16, 2)  # one log-std per (LSTM output, action) pair
    obs, state, starts = torch.randn(1, 3).expand(4000, 3), agent.initial_state(4000), torch.zeros(4000, dtype=bool)
    noise = agent.sample_noise(4000, np.random.default_rng(0))
    with torch.no_grad():
        action, logprob, entropy, _, _ = agent.get_action_and_value(obs, state, starts, noise=torch.from_numpy(noise))
        latent = agent.get_states(obs, state, starts)[0]
        mean = agent.actor(latent)
        torch.testing.assert_close(agent.get_action_and_value(obs, state, starts, greedy=True)[0], mean)
    torch.testing.assert_close(action, mean + torch.einsum("bh,bha->ba", latent, torch.from_numpy(noise)))
    std = (latent.square() @ agent.actor_logstd.detach().exp().square() + ppo_lstm.SDE_EPS).sqrt()
    dist = torch.distributions.Normal(mean, std)
    torch.testing.assert_close(logprob, dist.log_prob(action).sum(-1))
    torch.testing.assert_close(entropy, dist.entropy().sum(-1))
    spread = (action - mean).std(0) / std[0]
    assert ((spread - 1).abs() < 0.05).all(), spread


# ---------------------------------------------------------------- the script, run as a user runs it

LOSS_KEYS = ["value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac", "explained_variance"]
KEYS = ["charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS"]
KEYS += [f"losses/{k}" for k in LOSS_KEYS]
SMALL = ["--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "2"]


def test_the_issue_command(workdir):
    """`python ppo_lstm.py --env-id CartPole-v1 --total-timesteps 5000` just works: trains, logs, saves, evaluates."""
    result = run_in_process("ppo_lstm.py", "--env-id", "CartPole-v1", "--total-timesteps", "5000", cwd=workdir)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    scalars = read_scalars(run_dir)
    assert set(KEYS) <= set(scalars), set(KEYS) - set(scalars)
    assert [step for step, _ in scalars["charts/SPS"]] == [512 * i for i in range(1, 10)]
    assert "done: 4,608 steps" in result.stdout and "eval CartPole-v1:" in result.stdout
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["script"] == "ppo_lstm.py" and ckpt["global_step"] == 4608
    assert ckpt["args"]["lstm_hidden_size"] == 128 and ckpt["args"]["lstm_num_layers"] == 1


def test_checkpoint_eval_resume_rebuild_the_network(workdir):
    args = ["--env-id", "CartPole-v1", "--mask-velocity", "--lstm-hidden-size", "32", "--lstm-num-layers", "2", *SMALL]
    result = run_in_process("ppo_lstm.py", *args, "--total-timesteps", "256", "--eval-episodes", "0", cwd=workdir)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    ckpt_path = str(run_dir / "checkpoint.pt")
    # evaluation takes the env, --mask-velocity and the network from the checkpoint, whatever the flags say
    result = run_in_process("ppo_lstm.py", "--eval-checkpoint", ckpt_path, "--eval-episodes", "3", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "over 3 greedy episodes" in result.stdout and "done:" not in result.stdout
    # resuming must repeat them
    without_lstm_flags = ["--env-id", "CartPole-v1", "--mask-velocity", *SMALL]
    result = run_in_process(
        "ppo_lstm.py", *without_lstm_flags, "--resume", ckpt_path, "--total-timesteps", "512", cwd=workdir
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--resume: the checkpoint trained with --lstm-hidden-size 32; pass that" in result.stderr, result.stderr
    result = run_in_process(
        "ppo_lstm.py", *args, "--total-timesteps", "512", "--resume", ckpt_path, "--eval-episodes", "0", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    resumed = torch.load(ckpt_path, weights_only=True)
    assert resumed["global_step"] == 512 and resumed["args"]["mask_velocity"]
    assert resumed["model"]["lstm.weight_hh_l1"].shape == (4 * 32, 32)
    assert [step for step, _ in read_scalars(run_dir)["charts/SPS"]] == [128, 256, 384, 512]


@pytest.mark.parametrize(
    "env_id, extra",
    [
        ("tests.toy_envs:MultiDiscreteToy-v0", []),
        ("tests.toy_envs:MultiBinaryToy-v0", []),
        ("tests.toy_envs:OffsetDiscreteToy-v0", []),
        ("FrozenLake-v1", []),  # Discrete observations
        ("tests.toy_envs:MixedObsToy-v0", []),
        ("Blackjack-v1", []),
        ("tests.toy_envs:ImageObsToy-v0", []),
        ("tests.toy_envs:DictImageToy-v0", []),
        ("tests.toy_envs:BoxActionToy-v0", ["--norm-obs", "--norm-reward"]),
        ("tests.toy_envs:BoxActionToy-v0", ["--gsde", "--sde-sample-freq", "4", "--log-std-init", "-1", "--norm-obs"]),
        ("Pendulum-v1", ["--mask-velocity", "--norm-obs", "--norm-reward"]),
        ("InvertedPendulum-v4", ["--norm-obs", "--norm-reward"]),  # MuJoCo
        ("CartPole-v1", ["--env-backend", "envpool", "--mask-velocity"]),
        # Atari through envpool (4 x 84 x 84 uint8 frames); no greedy evaluation: until it fires, an episode never ends
        ("Breakout-v5", ["--num-steps", "16", "--eval-episodes", "0"]),
    ],
)
def test_observation_and_action_spaces(workdir, env_id, extra):
    result = run_in_process(
        "ppo_lstm.py",
        "--env-id",
        env_id,
        "--total-timesteps",
        "128",
        "--eval-episodes",
        "1",
        *SMALL,
        *extra,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 128 and ("obs_rms" in ckpt) == ("--norm-obs" in extra)
    if "--norm-obs" in extra:  # evaluation reads the normalisation statistics back
        result = run_in_process("ppo_lstm.py", "--eval-checkpoint", str(run_dir / "checkpoint.pt"), cwd=workdir)
        assert result.returncode == 0 and "over 10 greedy episodes" in result.stdout, result.stderr


def test_track_and_capture_video(workdir):
    result = run_script(
        "ppo_lstm.py",
        "--track",
        "--capture-video",
        "--total-timesteps",
        "128",
        "--eval-episodes",
        "2",
        *SMALL,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    videos = list((run_dir / "videos").glob("*.mp4"))
    assert len(videos) == 2 and all(v.stat().st_size > 1000 for v in videos)


def test_same_seed_same_run(workdir):
    returns = []
    for name in ("a", "b"):
        result = run_in_process(
            "ppo_lstm.py", "--total-timesteps", "3072", "--exp-name", name, "--eval-episodes", "0", cwd=workdir
        )
        assert result.returncode == 0, result.stderr
        (run_dir,) = (workdir / "runs").glob(f"*__{name}__*")
        returns.append(read_scalars(run_dir)["charts/episodic_return"])
    assert len(returns[0]) > 50 and returns[0] == returns[1]


# ---------------------------------------------------------------- learning a task that needs memory

# Calibration, CueRecallToy (tests/toy_envs.py) with the defaults at 30k steps (NumPy rollout policy): seeds 1-8
# reached a mean return over their last 100 episodes of 0.98, 0.98, 1.00, 0.98, 0.94, 1.00, 1.00, 0.98, and 1.00 in
# greedy evaluation (20 episodes), every one.
# A policy without memory has an expected return of 0 whatever it learns: ppo.py, seeds 1-5, 0.06, -0.10, -0.02, 0.02,
# 0.00 (greedy: -0.30 to 0.40).
LEARNING_STEPS, LEARNING_THRESHOLD = 30_000, 0.7


def test_learns_to_remember_a_cue(workdir):
    result = run_in_process(
        "ppo_lstm.py",
        "--env-id",
        "tests.toy_envs:CueRecallToy-v0",
        "--total-timesteps",
        str(LEARNING_STEPS),
        "--eval-episodes",
        "20",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    returns = [r for _, r in read_scalars(only_run_dir(workdir))["charts/episodic_return"]]
    assert np.mean(returns[-100:]) >= LEARNING_THRESHOLD, np.mean(returns[-100:])
    # the greedy evaluation carries the state through each episode and restarts it at the next
    eval_return = float(result.stdout.split("eval tests.toy_envs:CueRecallToy-v0: ")[1].split()[0])
    assert eval_return >= 0.9, result.stdout
