"""ppo_lstm_masked.py: ppo_lstm.py + action masks, the same lines as ppo_masked.py's.

A recurrent policy whose actions an env may forbid at a step (info["action_mask"], or a Dict observation
{"observation", "action_mask"}): masked actions get probability 0 in the rollout, the update's replay and the greedy
evaluation. Discrete, MultiDiscrete and MultiBinary actions, one categorical per component, the mask flat over them.

    # a cue recalled when the mask first allows an answer: 1.0 on 2 seeds of 3 (without the mask 0.0, without memory
    # -0.5, as ppo_masked.py: benchmark/results/masking/report.md)
    python ppo_lstm_masked.py --env-id benchmark.masked_tasks:MaskedCueRecall-v0 --total-timesteps 50000
"""

import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.distributions import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment, part of the run folder's name"""
    seed: int = 1
    """seed of random, numpy, torch and the environments"""
    cuda: bool = False
    """if toggled, train on the GPU where there is one (a 64x64 MLP trains faster on the CPU)"""
    track: bool = False
    """if toggled, log the run to Weights and Biases as well"""
    wandb_project_name: str = "ppo"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """if toggled, record videos of the evaluation episodes in the run folder's `videos/`"""
    save_interval: int = 50
    """write the checkpoint every this many iterations, and at the end (0: only at the end)"""
    eval_episodes: int = 10
    """greedy episodes played after training and by --eval-checkpoint (0: none)"""
    eval_checkpoint: str | None = None
    """play --eval-episodes greedy episodes with the checkpoint at this path, then exit"""
    resume: str | None = None
    """continue the run of the checkpoint at this path (weights, optimizer, global step, lr schedule)"""

    # Algorithm specific arguments
    env_id: str = "CartPole-v1"
    """the id of the environment: a gymnasium id, or `module:EnvId-v0` for one your module registers"""
    action_mask: bool = True
    """if toggled, the actions an env masks out are never taken (--no-action-mask: the env's masks are ignored)"""
    total_timesteps: int = 200000
    """total environment steps of the experiment, all envs together"""
    learning_rate: float = 1e-3
    """the learning rate of the optimizer"""
    num_envs: int = 8
    """the number of parallel environments"""
    num_steps: int = 32
    """the number of steps to run in each environment per policy rollout"""
    seq_len: int | None = None
    """the length of the sequences the update replays through the LSTM, dividing --num-steps (None: whole rollouts)"""
    lstm_hidden_size: int = 64
    """the number of the LSTM's units"""
    anneal_lr: bool = True
    """if toggled, the learning rate decays linearly to 0 over the run"""
    gamma: float = 0.98
    """the discount factor gamma"""
    gae_lambda: float = 0.8
    """the lambda of the general advantage estimation"""
    num_minibatches: int = 1
    """the number of minibatches (of whole sequences) per update epoch"""
    update_epochs: int = 20
    """the number of epochs over the rollout per update"""
    norm_adv: bool = True
    """if toggled, advantages are normalised per minibatch"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """if toggled, the value loss is clipped as in the PPO paper's code"""
    ent_coef: float = 0.0
    """the coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """the coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum norm of the gradient (clipped above it)"""
    target_kl: float | None = None
    """stop the update epochs early once the approximate KL passes this (None: never)"""


def fail(message: str, status: int = 2):
    """One line on stderr, then exit: status 2 for bad input (as for a flag tyro cannot parse), 1 for a failed run."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def check_args(args: Args) -> str | None:
    """The first thing wrong with the flags, as a message naming the flag, its value and what works; None if none."""
    batch_size = args.num_envs * args.num_steps
    positive = ["num_envs", "num_steps", "num_minibatches", "update_epochs", "learning_rate", "clip_coef"]
    positive += ["seq_len", "lstm_hidden_size"]
    checks = [
        (not 0 < getattr(args, flag) < np.inf, f"--{flag.replace('_', '-')} {getattr(args, flag)} must be positive")
        for flag in positive + ["max_grad_norm"] + ["target_kl"] * (args.target_kl is not None)
    ]
    checks += [
        (args.num_steps % max(args.seq_len, 1), f"--seq-len {args.seq_len} does not divide --num-steps "
         f"{args.num_steps}"),
        (args.num_minibatches > batch_size // max(args.seq_len, 1), f"--num-minibatches {args.num_minibatches} is "
         f"more than the {batch_size // max(args.seq_len, 1)} sequences of --seq-len {args.seq_len} in a rollout"),
        (args.total_timesteps < batch_size and not args.eval_checkpoint,
         f"--total-timesteps {args.total_timesteps} is less than one batch of {batch_size} steps"),
        (not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1),
         f"--gamma {args.gamma} and --gae-lambda {args.gae_lambda} must lie in [0, 1]"),
        (not (0 <= args.ent_coef < np.inf and 0 <= args.vf_coef < np.inf),
         f"--ent-coef {args.ent_coef} and --vf-coef {args.vf_coef} must be 0 or positive"),
        (args.save_interval < 0, f"--save-interval {args.save_interval} must be 0 or more"),
        (args.eval_episodes < 0 or args.eval_checkpoint and not args.eval_episodes,
         f"--eval-episodes {args.eval_episodes} must be 0 or more (1 or more with --eval-checkpoint)"),
        (bool(args.eval_checkpoint and args.resume), "--eval-checkpoint and --resume exclude each other: pass one"),
    ]  # fmt: skip
    return next((message for bad, message in checks if bad), None)


def make_envs(env_id: str, num_envs: int, video_folder: str | None = None) -> gym.vector.VectorEnv:
    """Vector envs with next-step autoreset: the step after one that ends an episode returns the first observation of
    the next one, reward 0, and ignores its action. RecordEpisodeStatistics reports each episode's real return and
    length (that reset step counted in neither) in info["episode"]."""

    def make_env():
        env = gym.make(env_id, **({"render_mode": "rgb_array"} if video_folder else {}))
        if video_folder:
            env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda episode: True)
        if isinstance(env.observation_space, gym.spaces.Dict) and "action_mask" in env.observation_space.spaces:
            env = MaskInInfo(env)
        if isinstance(env.action_space, gym.spaces.Box):  # the Gaussian's samples, clipped to the bounds
            env = gym.wrappers.ClipAction(env)
        # any observation space (Discrete, Dict, Tuple, images, ...) as one flat vector, as SB3 flattens it
        return gym.wrappers.FlattenObservation(env)

    envs = gym.vector.SyncVectorEnv([make_env] * num_envs, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


class MaskInInfo(gym.Wrapper):
    """A Dict observation {"observation", "action_mask"} as its "observation", the mask moved to info["action_mask"]."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = env.observation_space["observation"]

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs["observation"], info | {"action_mask": obs["action_mask"]}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs["observation"], reward, terminated, truncated, info | {"action_mask": obs["action_mask"]}


def action_nvec(space: gym.Space) -> list[int]:
    """The sizes of an action's categorical components: one per Discrete, MultiDiscrete entry or MultiBinary bit."""
    if isinstance(space, gym.spaces.Discrete):
        return [int(space.n)]
    if isinstance(space, gym.spaces.MultiDiscrete):
        return space.nvec.flatten().tolist()
    return [2] * int(np.prod(space.shape))  # MultiBinary


def action_masks(info: dict, num_envs: int, size: int, use: bool, device) -> torch.Tensor:
    """The envs' action masks, [num_envs, size] bool, flat over the components; all True where an env gives none."""
    masks = np.ones((num_envs, size), dtype=bool)
    if use and "action_mask" in info:
        masks[info["_action_mask"]] = info["action_mask"][info["_action_mask"]].reshape(-1, size) != 0
    return torch.as_tensor(masks, device=device)


def env_action(action: torch.Tensor, space: gym.Space) -> np.ndarray:
    """[num_envs, components] categories -> the env's layout and numbering (a Discrete's or MultiDiscrete's start)."""
    return action.cpu().numpy().reshape(len(action), *space.shape) + getattr(space, "start", 0)


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, envs, lstm_hidden_size: int):
        super().__init__()
        obs_dim = int(np.prod(envs.single_observation_space.shape))
        self.encoder = nn.Sequential(layer_init(nn.Linear(obs_dim, 64)), nn.Tanh())
        self.lstm = nn.LSTM(64, lstm_hidden_size)
        for name, param in self.lstm.named_parameters():
            if "bias" in name:
                nn.init.constant_(param, 0)
            elif "weight" in name:
                nn.init.orthogonal_(param, 1.0)
        # heads of one hidden layer each over the LSTM's output, as RL Zoo's recurrent policies (net_arch 64)
        self.critic = nn.Sequential(
            layer_init(nn.Linear(lstm_hidden_size, 64)), nn.Tanh(), layer_init(nn.Linear(64, 1), std=1.0)
        )
        self.nvec = action_nvec(envs.single_action_space)
        self.actor = nn.Sequential(
            layer_init(nn.Linear(lstm_hidden_size, 64)), nn.Tanh(), layer_init(nn.Linear(64, sum(self.nvec)), std=0.01)
        )

    def get_states(self, x, lstm_state, starts):
        """The LSTM over x, [steps * envs, ...] in step-major order, from lstm_state; an env's state restarts at 0
        where starts (its observation begins an episode). One LSTM call per stretch of steps without a start."""
        hidden = self.encoder(x).view(-1, lstm_state[0].shape[1], self.lstm.input_size)
        starts = starts.view(len(hidden), -1)
        bounds = [0, *(torch.nonzero(starts[1:].any(1)).flatten() + 1).tolist(), len(hidden)]
        outputs = []
        for t0, t1 in zip(bounds[:-1], bounds[1:]):
            keep = (~starts[t0]).view(1, -1, 1).float()
            output, lstm_state = self.lstm(hidden[t0:t1], (keep * lstm_state[0], keep * lstm_state[1]))
            outputs.append(output)
        return torch.cat(outputs).flatten(0, 1), lstm_state

    def get_value(self, x, lstm_state, starts):
        return self.critic(self.get_states(x, lstm_state, starts)[0])

    def get_action_and_value(self, x, lstm_state, starts, action=None, greedy=False, mask=None):
        hidden, lstm_state = self.get_states(x, lstm_state, starts)
        logits = self.actor(hidden)
        if mask is not None:  # a masked action's probability is exactly 0 in float32
            logits = logits.masked_fill(~mask, -1e8)
        split = [Categorical(logits=part) for part in logits.split(self.nvec, dim=1)]
        if action is None:
            action = torch.stack([probs.mode if greedy else probs.sample() for probs in split], 1)
        logprob = sum(probs.log_prob(a) for probs, a in zip(split, action.T))
        return action, logprob, sum(probs.entropy() for probs in split), self.critic(hidden), lstm_state


def compute_gae(rewards, values, terminations, truncations, resets, next_value, gamma, gae_lambda):
    """Generalised advantage estimation over a [num_steps, num_envs] rollout under next-step autoreset.

    Step t is the transition obs[t] -> obs[t + 1] with rewards[t]. When it ends an episode, obs[t + 1] is the real
    final observation, so values[t + 1] (next_value after the last step) is its value: a truncated episode bootstraps
    from it, a terminated one does not. The step after (resets[t + 1]) only resets the env: it is no transition, gets
    advantage 0 and is cut out of the recursion. Returns (advantages, returns).
    """
    advantages = np.zeros_like(rewards)
    lastgaelam = np.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        nextvalues = next_value if t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * ~terminations[t] - values[t]
        lastgaelam = delta + gamma * gae_lambda * ~(terminations[t] | truncations[t]) * lastgaelam
        lastgaelam = advantages[t] = lastgaelam * ~resets[t]
    return advantages, advantages + values


@torch.no_grad()
def evaluate(agent: Agent, env_id: str, episodes: int, seed: int, video_folder=None, use_mask=True) -> list[float]:
    """The real returns of `episodes` episodes played with the greedy policy (each component's most likely action)."""
    envs = make_envs(env_id, 1, video_folder)
    device = next(agent.parameters()).device
    obs, info = envs.reset(seed=seed)
    state = (torch.zeros(1, 1, agent.lstm.hidden_size, device=device),) * 2
    returns, start, reset = [], torch.ones(1, dtype=torch.bool, device=device), np.zeros(1, dtype=bool)
    while len(returns) < episodes:
        mask = action_masks(info, 1, sum(agent.nvec), use_mask, device)
        x = torch.as_tensor(obs, dtype=torch.float32, device=device)
        action, _, _, _, state = agent.get_action_and_value(x, state, start, greedy=True, mask=mask)
        obs, _, terminated, truncated, info = envs.step(env_action(action, envs.single_action_space))
        start, reset = torch.as_tensor(reset, device=device), terminated | truncated  # after a reset step: a start
        if "episode" in info:
            returns += info["episode"]["r"][info["_episode"]].tolist()
    envs.close()
    print(f"eval {env_id}: {np.mean(returns):.2f} ± {np.std(returns):.2f} over {episodes} greedy episodes")
    return returns


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint whole."""
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path: str, flag: str, script: str = os.path.basename(__file__)) -> dict:
    """Read a checkpoint of the script as data (weights_only: no code in it runs); one error line otherwise."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{flag} {path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != script:
        fail(f"{flag} {path} was not written by {script}; load it with the script that wrote it")
    return checkpoint


def main(args: Args) -> None:
    args.seq_len = args.seq_len or args.num_steps
    if message := check_args(args):
        fail(message)
    checkpoint, flag = None, "--eval-checkpoint" if args.eval_checkpoint else "--resume"
    if args.eval_checkpoint or args.resume:
        checkpoint = load_checkpoint(args.eval_checkpoint or args.resume, flag)
        if args.eval_checkpoint:  # the checkpoint's env, whatever --env-id says
            args.env_id = checkpoint["args"]["env_id"]
        elif checkpoint["args"]["env_id"] != args.env_id:
            fail(f"--resume: the checkpoint trained on {checkpoint['args']['env_id']}; pass --env-id with it")
    batch_size = args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    global_step = checkpoint["global_step"] if args.resume else 0
    if global_step >= num_iterations * batch_size and args.resume:
        fail(f"--resume: the checkpoint is at step {global_step:,} already; raise --total-timesteps")

    # A resumed run seeds from the step it resumes at, so that it does not replay the episodes of its start.
    seed = args.seed + global_step
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # torch's own threads, one a core (OMP_NUM_THREADS sets another number): the LSTM's update is worth them
    # Distributions skip checking their arguments, a dozen small ops a call (a NaN stops the run all the same, below).
    torch.distributions.Distribution.set_default_validate_args(False)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    try:
        envs = make_envs(args.env_id, 1 if args.eval_checkpoint else args.num_envs)
    except (gym.error.Error, ImportError) as e:
        fail(f"--env-id {args.env_id}: {e}")
    space = envs.single_action_space
    if not isinstance(space, gym.spaces.Discrete | gym.spaces.MultiDiscrete | gym.spaces.MultiBinary):
        fail(f"--env-id {args.env_id}: its actions are {type(space).__name__}; ppo_lstm_masked.py takes Discrete, "
             "MultiDiscrete and MultiBinary ones (ppo_lstm.py: Box)")  # fmt: skip
    agent = Agent(envs, args.lstm_hidden_size).to(device)
    if checkpoint:
        try:
            agent.load_state_dict(checkpoint["model"])
        except RuntimeError:
            fail(f"{flag}: the checkpoint's network does not fit this Agent on {args.env_id}")
    if args.eval_checkpoint:
        envs.close()
        video_folder = os.path.join(os.path.dirname(args.eval_checkpoint), "videos") if args.capture_video else None
        evaluate(agent, args.env_id, args.eval_episodes, seed, video_folder, args.action_mask)
        return

    # Fused Adam: one kernel for all parameters instead of a loop over them
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        run_dir = os.path.dirname(os.path.abspath(args.resume))  # its curves go on in its own folder
    else:
        run_name = f"{args.env_id.rpartition(':')[2]}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join("runs", run_name)
    os.makedirs(run_dir, exist_ok=True)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=os.path.basename(run_dir), dir=run_dir, save_code=True)  # fmt: skip
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    # Rollout storage, [num_steps, num_envs, ...]
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs, len(agent.nvec)), dtype=torch.long).to(device)
    masks = torch.zeros((args.num_steps, args.num_envs, sum(agent.nvec)), dtype=torch.bool).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    # what the envs return stays in NumPy, where GAE runs: one copy to the device instead of one a step
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    truncations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    resets = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    starts = np.zeros((args.num_steps, args.num_envs), dtype=bool)  # the episodes' first observations
    # the LSTM state (h, c) where each sequence the update replays starts: [2, layers, sequences per env, envs, units]
    seqs_per_env, num_sequences = args.num_steps // args.seq_len, args.num_steps // args.seq_len * args.num_envs
    seq_states = torch.zeros((2, 1, seqs_per_env, args.num_envs, args.lstm_hidden_size)).to(device)

    next_obs, info = envs.reset(seed=seed)
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
    next_mask = action_masks(info, args.num_envs, sum(agent.nvec), args.action_mask, device)
    next_reset = np.zeros(args.num_envs, dtype=bool)  # the envs whose next step is a reset step
    next_start = np.ones(args.num_envs, dtype=bool)
    lstm_state = (torch.zeros(1, args.num_envs, args.lstm_hidden_size, device=device),) * 2
    start_time, start_step = time.time(), global_step
    progress = tqdm(total=num_iterations * batch_size, initial=global_step, unit="step", smoothing=0.1)

    for iteration in range(global_step // batch_size + 1, num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        # the rollout: no autograd bookkeeping at all; the LSTM stepped one observation at a time, which torch's own
        # kernels do faster than oneDNN's (the update, replaying whole sequences, keeps oneDNN: there it is the faster)
        with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False):
            for step in range(args.num_steps):
                global_step += args.num_envs
                obs[step] = next_obs
                resets[step] = next_reset
                starts[step] = next_start
                masks[step] = next_mask
                if step % args.seq_len == 0:
                    seq_states[:, :, step // args.seq_len] = torch.stack(lstm_state)
                start = torch.as_tensor(next_start, device=device)
                action, logprob, _, value, lstm_state = agent.get_action_and_value(
                    next_obs, lstm_state, start, mask=next_mask
                )
                values[step] = value.flatten()
                actions[step] = action
                logprobs[step] = logprob

                next_obs, rewards[step], terminations[step], truncations[step], info = envs.step(
                    env_action(action, envs.single_action_space)
                )
                if not np.isfinite(next_obs).all():  # a broken env: stop before sampling from it
                    fail(f"step {global_step}: NaN or infinity in the observations; the last checkpoint is good", 1)
                next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
                # after a reset step, the next observation begins an episode
                next_start, next_reset = next_reset, terminations[step] | truncations[step]
                next_mask = action_masks(info, args.num_envs, sum(agent.nvec), args.action_mask, device)
                if "episode" in info:
                    for i in np.flatnonzero(info["_episode"]):
                        writer.add_scalar("charts/episodic_return", info["episode"]["r"][i], global_step)
                        writer.add_scalar("charts/episodic_length", info["episode"]["l"][i], global_step)
                    progress.set_postfix(episodic_return=info["episode"]["r"][info["_episode"]].mean(), refresh=False)

            start = torch.as_tensor(next_start, device=device)
            next_value = agent.get_value(next_obs, lstm_state, start).flatten().cpu().numpy()
        advantages, returns = compute_gae(
            rewards, values.cpu().numpy(), terminations, truncations, resets, next_value, args.gamma, args.gae_lambda
        )

        # The batch as sequences of seq_len steps, flat and step-major: entry t * num_sequences + i is step t of
        # sequence i, and sequence i = c * num_envs + e is env e's c-th of the rollout.
        def sequences(x):
            x = torch.as_tensor(x, device=device)
            return x.view(seqs_per_env, args.seq_len, *x.shape[1:]).transpose(0, 1).flatten(0, 2)

        b_obs, b_actions, b_logprobs, b_values = (sequences(x) for x in (obs, actions, logprobs, values))
        b_masks = sequences(masks)
        b_advantages, b_returns, b_starts, b_keep = (sequences(x) for x in (advantages, returns, starts, ~resets))
        b_states = seq_states.flatten(2, 3)  # [2, layers, sequences, units]

        # Optimizing the policy and value network
        stats = torch.zeros(6, device=device)  # the losses below, summed over the minibatches
        num_updates = 0
        for epoch in range(args.update_epochs):
            for mb_seqs in torch.randperm(num_sequences, device=device).tensor_split(args.num_minibatches):
                mb_steps = (torch.arange(args.seq_len, device=device)[:, None] * num_sequences + mb_seqs).flatten()
                _, newlogprob, entropy, newvalue, _ = agent.get_action_and_value(
                    b_obs[mb_steps],
                    tuple(b_states[:, :, mb_seqs]),
                    b_starts[mb_steps],
                    b_actions[mb_steps],
                    mask=b_masks[mb_steps],
                )
                keep = b_keep[mb_steps]  # the reset steps of next-step autoreset are no transitions: not trained
                newlogprob, entropy, newvalue, mb_inds = newlogprob[keep], entropy[keep], newvalue[keep], mb_steps[keep]
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()
                if num_updates == 0 and logratio.abs().max() > 1e-4:  # the network has not moved since the rollout
                    fail(f"iteration {iteration}: the first minibatch's ratio is not 1 (|log ratio| up to "
                         f"{logratio.abs().max():.2g}): the update's policy is not the rollout's", 1)  # fmt: skip

                with torch.no_grad():
                    # calculate approx_kl http://joschu.net/blog/kl-approx.html
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss
                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                    v_clipped = b_values[mb_inds] + torch.clamp(
                        newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef
                    )
                    v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                    v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                stats += torch.stack([v_loss, pg_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac]).detach()
                num_updates += 1

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        # losses averaged over every minibatch of the iteration, not taken from the last one
        stats = dict(zip(["value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"],
                         (stats / num_updates).tolist()))  # fmt: skip
        if not np.isfinite(list(stats.values())).all():  # checked before the checkpoint: the one on disk stays good
            fail(f"iteration {iteration}: NaN or infinity in the losses {stats}; the last checkpoint is good", 1)
        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        sps = int((global_step - start_step) / (time.time() - start_time))
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for key, value in stats.items():
            writer.add_scalar(f"losses/{key}", value, global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        progress.update(global_step - progress.n)

        if args.save_interval and iteration % args.save_interval == 0 or iteration == num_iterations:
            save_checkpoint(checkpoint_path, {"script": os.path.basename(__file__), "args": asdict(args),
                                              "global_step": global_step, "model": agent.state_dict(),
                                              "optimizer": optimizer.state_dict()})  # fmt: skip

    progress.close()
    recent = np.mean(envs.return_queue) if envs.return_queue else np.nan  # RecordEpisodeStatistics' last 100
    print(f"done: {global_step:,} steps in {time.time() - start_time:.1f} s ({sps:,} SPS); mean return of the last "
          f"{len(envs.return_queue)} episodes {recent:.2f}; checkpoint {checkpoint_path}")  # fmt: skip
    envs.close()
    if args.eval_episodes:
        video_folder = os.path.join(run_dir, "videos") if args.capture_video else None
        returns = evaluate(agent, args.env_id, args.eval_episodes, seed, video_folder, args.action_mask)
        writer.add_scalar("eval/episodic_return", np.mean(returns), global_step)
    writer.close()
    if args.track:
        wandb.finish()


if __name__ == "__main__":
    main(tyro.cli(Args))
