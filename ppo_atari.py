"""PPO for Atari games through envpool: ppo.py changed for pixels.

A copy of ppo.py, the reference script of this project, for the Atari games: envpool's standard preprocessing (no-op
starts, frame skip 4 with max-pooling, 84x84 grayscale, 4 frames stacked, a lost life ends the episode for training,
rewards clipped to their sign, fire on reset), the Nature CNN trunk shared by actor and critic, observations kept as
uint8 and scaled inside the network. Episode statistics are the real game: the unclipped score over all lives. The
defaults are CleanRL's ppo_atari_envpool.py settings.

Paper: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347
Details: Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization", ICLR blog track;
Machado et al. 2018, "Revisiting the Arcade Learning Environment", https://arxiv.org/abs/1709.06009

    python ppo_atari.py                                       # Breakout-v5, 10M steps
    python ppo_atari.py --env-id Pong-v5 --total-timesteps 2000000 --track
    python ppo_atari.py --eval-checkpoint runs/RUN/checkpoint.pt --capture-video
"""

import contextlib
import difflib
import io
import itertools
import os
import random
import sys
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass

import envpool
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment, part of the run folder's name"""
    seed: int = 1
    """seed of random, numpy, torch and the environments"""
    cuda: bool = True
    """if toggled, the network trains on the GPU (CUDA) where there is one: the Nature CNN trains faster there"""
    track: bool = False
    """if toggled, log the run to Weights and Biases as well"""
    wandb_project_name: str = "ppo"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """if toggled, record videos of the evaluation games under the run folder (`videos/`)"""
    save_interval: int = 0
    """also write the checkpoint every this many iterations (0: only at the end of training)"""
    eval_episodes: int = 10
    """greedy-policy games played after training and by --eval-checkpoint (0: no evaluation)"""
    eval_checkpoint: str | None = None
    """evaluate the checkpoint at this path with the greedy policy, then exit without training"""
    resume: str | None = None
    """continue the run of the checkpoint at this path (weights, optimizer, global step, lr schedule)"""

    # Algorithm specific arguments
    env_id: str = "Breakout-v5"
    """the id of an Atari game of envpool, e.g. Breakout-v5, Pong-v5, BeamRider-v5"""
    total_timesteps: int = 10000000
    """total environment steps of the experiment, all envs together (4 frames each)"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 8
    """the number of parallel environments"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """if toggled, the learning rate decays linearly to 0 over the run"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda of the general advantage estimation"""
    num_minibatches: int = 4
    """the number of minibatches per update epoch"""
    update_epochs: int = 4
    """the number of epochs over the rollout per update"""
    norm_adv: bool = True
    """if toggled, advantages are normalised per minibatch"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """if toggled, the value loss is clipped as in the PPO paper's code"""
    ent_coef: float = 0.01
    """the coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """the coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum norm of the gradient (clipped above it)"""
    target_kl: float | None = None
    """stop the update epochs early once the approximate KL passes this (None: never)"""
    bf16: bool = True
    """if toggled, the CNN computes in bfloat16 (float32 weights, heads, losses) on a GPU or a CPU that supports it"""


class UserError(Exception):
    """A mistake in the input: printed as one line, exit status 2 (as for a bad flag), no traceback."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())  # one line, whatever it quotes (a 2-D space's repr spans two)


# Envpool warns that reset(seed=) is ignored (its envs are seeded in envpool.make, as make_envs does) and that its
# spaces' float64 bounds become float32: neither applies to a user's run.
warnings.filterwarnings("ignore", message=".*(EnvPool seeds are fixed|precision lowered by casting).*")


def check_numbers(args) -> None:
    """The algorithm's numeric flags, each in its range (NaN and infinity refused), and an evaluation that plays."""
    for flag in ("learning_rate", "clip_coef", "max_grad_norm", "ent_coef", "vf_coef", "target_kl"):
        value, zero_ok = getattr(args, flag), flag in ("ent_coef", "vf_coef")
        if value is not None and not ((0 <= value if zero_ok else 0 < value) and value < np.inf):  # NaN fails both
            raise UserError(
                f"--{flag.replace('_', '-')} {value} must be {'0 or a positive' if zero_ok else 'a positive'} number"
            )
    if args.eval_checkpoint and not args.eval_episodes:
        raise UserError("--eval-checkpoint with --eval-episodes 0 evaluates nothing: pass --eval-episodes 1 or more")


def validate_args(args: Args) -> None:
    for flag in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be positive")
    if args.eval_episodes < 0 or args.save_interval < 0:
        raise UserError("--eval-episodes and --save-interval must be 0 or more")
    check_numbers(args)
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches or batch_size // args.num_minibatches < 2:
        raise UserError(
            f"--num-minibatches {args.num_minibatches} does not divide the batch of {batch_size} "
            f"(--num-envs {args.num_envs} x --num-steps {args.num_steps}) into minibatches of 2 or more"
        )
    if args.total_timesteps < batch_size and not args.eval_checkpoint:
        raise UserError(f"--total-timesteps {args.total_timesteps} is less than one batch of {batch_size} steps")
    if not 0 <= args.gamma <= 1 or not 0 <= args.gae_lambda <= 1:
        raise UserError("--gamma and --gae-lambda must lie in [0, 1]")
    if args.eval_checkpoint and args.resume:
        raise UserError("--eval-checkpoint and --resume exclude each other: pass one")


def check_atari_id(env_id: str) -> None:
    """Raise UserError unless env_id is one of envpool's Atari games, naming the script or the id that would do."""
    atari = [task for task, spec in envpool.registration.registry.specs.items() if spec[0] == "envpool.atari"]
    if env_id in atari:
        return
    if env_id in envpool.list_all_envs() or env_id in gym.registry or ":" in env_id:
        raise UserError(
            f"--env-id {env_id} is not an Atari game: use ppo.py (discrete actions) or ppo_continuous.py (continuous)"
        )
    close = difflib.get_close_matches(env_id, atari, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}?" if close else "e.g. Breakout-v5, Pong-v5"
    raise UserError(f"--env-id {env_id} is not one of envpool's Atari games ({hint})")


def make_envs(env_id: str, num_envs: int, seed: int, render: bool = False):
    """Atari games with the standard preprocessing (Machado et al. 2018, as baselines' wrappers and CleanRL), spelled
    out rather than left to envpool's defaults. Next-step autoreset, as ppo.py's envs: after a step that ends an
    episode (here a lost life too), the next step only resets it, with reward 0, ignoring its action."""
    return envpool.make(
        env_id,
        env_type="gymnasium",
        num_envs=num_envs,
        seed=seed,
        noop_max=30,  # up to 30 no-ops at the start of a game: varied starting states
        frame_skip=4,  # each action repeats for 4 frames; the observation is the max of the last two (flicker)
        img_height=84,
        img_width=84,
        gray_scale=True,
        stack_num=4,  # the last 4 observations, stacked as channels: motion is visible
        episodic_life=True,  # a lost life ends the episode for training (no value bootstrapped across it)
        use_fire_reset=True,  # games that wait for FIRE (Breakout) get it after every reset, lost lives included
        reward_clip=True,  # training rewards are clipped to their sign; info["reward"] keeps the real score
        repeat_action_probability=0.0,  # no sticky actions, as CleanRL's published runs
        max_episode_steps=27000,  # a game is truncated after 108,000 frames (30 minutes of play)
        **({"render_mode": "rgb_array"} if render else {}),
    )


def choose_device(cuda: bool) -> torch.device:
    if cuda and not torch.cuda.is_available():
        print("note: --cuda: torch sees no CUDA device here; running on the CPU")
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """The Nature CNN (Mnih et al. 2015) trunk shared by the actor and the critic heads."""

    def __init__(self, obs_space: gym.Space, act_space: gym.Space, bf16: bool = False):
        super().__init__()
        self.bf16 = bf16
        channels, height, width = obs_space.shape  # envpool stacks the frames first
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(channels, 32, 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
            nn.Flatten(),
        )
        try:  # the size of the convolutions' output, for this image size (64 x 7 x 7 for 84 x 84)
            conv_size = self.network(torch.zeros(1, channels, height, width)).shape[1]
        except RuntimeError:
            raise UserError(f"images of shape {obs_space.shape} are smaller than the Nature CNN's 36x36") from None
        self.network.extend([layer_init(nn.Linear(conv_size, 512)), nn.ReLU()])
        self.actor = layer_init(nn.Linear(512, int(act_space.n)), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1.0)

    def features(self, x):
        """uint8 frames [batch, stack, height, width] -> features. Channels-last memory, in which the rollout stores
        the frames, is the layout that oneDNN's convolutions run fastest in. The frames are scaled to [0, 1] here, so
        that the rollout stores a quarter of the bytes, and cast straight to the type the trunk computes in: bfloat16
        with --bf16 (its weights stay float32); the heads and the losses compute in float32."""
        x = x.contiguous(memory_format=torch.channels_last).to(torch.bfloat16 if self.bf16 else torch.float32)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.network(x / 255).float()

    def get_value(self, x):
        return self.critic(self.features(x)).squeeze(-1)

    def get_action_and_value(self, x, action=None, greedy=False):
        # Categorical maths written out, as in ppo.py.
        hidden = self.features(x)
        logp = self.actor(hidden).log_softmax(-1)
        if action is None:
            # Gumbel-max: argmax(logp + Gumbel noise) samples the categorical, in fewer ops than torch.multinomial
            action = logp if greedy else logp - torch.empty_like(logp).exponential_().log()
            action = action.argmax(-1)
        logprob = logp.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return action, logprob, entropy, self.critic(hidden).squeeze(-1)


# Float32 rounding in another order (NumPy, another batch size) moves a log-probability or a value by about 1e-6 of
# its size; two different networks, or one before and after an optimizer step, differ by far more.
ROLLOUT_TOLERANCE = 1e-4


def rollout_mismatch(newlogprob, logprob, newvalue, value, tolerance: float = ROLLOUT_TOLERANCE) -> str:
    """What differs between the log-probabilities and values the rollout stored and the network's on the same
    observations and actions ("" if nothing does beyond float rounding)."""
    errors = []
    for name, new, old in (("log-probabilities", newlogprob, logprob), ("values", newvalue, value)):
        new, old = torch.as_tensor(new).float().cpu(), torch.as_tensor(old).float().cpu()
        error = (new - old).abs()
        if (error > tolerance * (1 + old.abs())).any():
            errors.append(f"{name} by up to {error.max().item():.3g}")
    return " and ".join(errors)


# bfloat16 keeps 8 bits of mantissa: the same trunk over another batch size (another kernel) may round its features
# otherwise, moving a log-probability or value by up to a few 1e-2 (tests: bf16 stays within 0.05 of float32).
BF16_ROLLOUT_TOLERANCE = 0.05


def check_rollout(newlogprob, logprob, newvalue, value, iteration: int, tolerance: float = ROLLOUT_TOLERANCE) -> None:
    """The guard of every update: before its first optimizer step, the network must give the rollout's stored
    log-probabilities and values back (a probability ratio of 1). Raises UserError naming what diverged."""
    mismatch = rollout_mismatch(newlogprob, logprob, newvalue, value, tolerance)
    if mismatch:
        raise UserError(
            f"iteration {iteration}: the network's {mismatch} differ from the rollout's before any update, so the "
            "rollout sampled from another policy than the one trained; the rollout and the update must compute the "
            "same network on the same observations (a random layer such as Dropout breaks that)"
        )


def torch_policy(agent: Agent, device: torch.device):
    """The rollout's sampling by the torch network itself: obs -> (action, logprob, value), NumPy in and out."""

    def policy(obs):
        with torch.inference_mode():  # no autograd bookkeeping at all: the fastest mode
            action, logprob, _, value = agent.get_action_and_value(torch.from_numpy(obs).to(device))
        return action.cpu().numpy(), logprob.cpu().numpy(), value.cpu().numpy()

    return policy


def check_finite(iteration: int, **arrays) -> None:
    """Stop at a NaN or an infinity, naming where it appeared. It is checked before the iteration's checkpoint is
    written, so the last checkpoint on disk is the last good one."""
    for name, x in arrays.items():
        if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.isfinite(x).all():  # integers hold neither
            raise UserError(
                f"iteration {iteration}: NaN or infinity in the {name.replace('_', ' ')}; stopped, the last checkpoint "
                "written is the last good one"
            )


def compute_gae(rewards, values, terminations, truncations, resets, next_value, gamma, gae_lambda):
    """Generalised advantage estimation over a [num_steps, num_envs] rollout, under next-step autoreset.

    Step t is the transition obs[t] -> obs[t + 1] with reward[t]. When it ends an episode, obs[t + 1] is the real
    final observation, so values[t + 1] (or next_value after the last step) is its value: a truncated episode is
    bootstrapped from it, a terminated one is not. The step after (resets[t + 1]) only resets the env: it is not a
    transition, gets advantage 0 and is cut out of the recursion. Returns (advantages, returns).
    """
    num_steps = len(rewards)
    advantages = np.zeros_like(rewards)
    lastgaelam = np.zeros_like(next_value)
    for t in reversed(range(num_steps)):
        nextvalues = next_value if t == num_steps - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * ~terminations[t] - values[t]
        lastgaelam = delta + gamma * gae_lambda * ~(terminations[t] | truncations[t]) * lastgaelam
        lastgaelam = lastgaelam * ~resets[t]
        advantages[t] = lastgaelam
    return advantages, advantages + values


class EpisodeTracker:
    """Real return and length of each env's current episode. The reset step of next-step autoreset belongs to
    neither episode; `reset` tells which envs' next step is one."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.reset = np.zeros(num_envs, dtype=bool)

    def step(self, reward, terminated, truncated) -> list:
        """Account one vector step; returns (return, length) of each episode that it ended."""
        self.returns += reward
        self.lengths += 1
        if self.reset.any():
            self.returns[self.reset] = 0
            self.lengths[self.reset] = 0
        self.reset = terminated | truncated
        return (
            list(zip(self.returns[self.reset].tolist(), self.lengths[self.reset].tolist())) if self.reset.any() else []
        )


def track_games(games: EpisodeTracker, info: dict, truncated: np.ndarray) -> list:
    """Account one vector step of whole games: (score, length) of each game it ended. The training episodes end at
    every lost life and see clipped rewards; a game ends when the last life is lost (info["terminated"]) or at the
    time limit, and scores the real rewards (info["reward"]). Its length counts every step, the reset steps after a
    lost life included (as CleanRL's)."""
    return games.step(info["reward"], info["terminated"].astype(bool), truncated)


class Progress:
    """The run's progress: tqdm's bar on a terminal; in a log file, a plain line every 10 s (and at the end)."""

    def __init__(self, total: int, initial: int):
        self.total, self.last_print = total, 0.0
        bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]"
        self.bar = (
            tqdm(total=total, initial=initial, bar_format=bar_format, file=sys.stdout) if sys.stdout.isatty() else None
        )

    def update(self, step: int, status: str) -> None:
        if self.bar:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(step - self.bar.n)
        elif time.time() - self.last_print >= 10.0 or step >= self.total:
            print(f"{step:,}/{self.total:,} steps | {status}", flush=True)
            self.last_print = time.time()

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def evaluate(agent: Agent, envs, num_episodes: int, video_folder: str | None = None) -> list:
    """Real scores of num_episodes games played with the greedy policy (the most likely action); with video_folder,
    one video of each game there, as the emulator's full-colour screen."""
    next_obs, _ = envs.reset()
    games, returns, video, device = EpisodeTracker(envs.num_envs), [], None, next(agent.parameters()).device
    while len(returns) < num_episodes:
        if video_folder and video is None and not games.reset.any():  # a game begins (not its reset step)
            import imageio  # (installed with moviepy) streams the video: a long game does not pile up in memory

            os.makedirs(video_folder, exist_ok=True)
            path = os.path.join(video_folder, f"eval-episode-{len(returns)}.mp4")
            # 60 frames per second, frame_skip of them per step: the video plays at the game's speed
            video = imageio.get_writer(path, fps=60 / envs.spec.config.frame_skip, macro_block_size=1)
            video.append_data(envs.render()[0])
        with torch.no_grad():
            action = agent.get_action_and_value(torch.from_numpy(next_obs).to(device), greedy=True)[0].cpu().numpy()
        next_obs, _, _, truncated, info = envs.step(action)
        ended = track_games(games, info, truncated)
        if video:
            video.append_data(envs.render()[0])
        returns += [episode_return for episode_return, _ in ended]
        if video and ended:
            video.close()
            video = None
    return returns[:num_episodes]


def run_evaluation(agent: Agent, args: Args, seed: int, video_folder: str | None) -> list:
    """Evaluate on a fresh env (rendered when recording videos) and print mean ± std."""
    envs = make_envs(args.env_id, 1, seed, render=video_folder is not None)
    returns = evaluate(agent, envs, args.eval_episodes, video_folder)
    envs.close()
    print(f"eval {args.env_id}: {np.mean(returns):.2f} ± {np.std(returns):.2f} over {len(returns)} greedy games")
    return returns


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, flag: str, script: str) -> dict:
    """Read a checkpoint as data (weights_only: no code runs); raises UserError naming the flag if it is unusable."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{flag} {path} is not a readable checkpoint ({type(e).__name__}); pass one from {script}"
        ) from None
    if not isinstance(checkpoint, dict) or not {"script", "args", "global_step", "model"} <= checkpoint.keys():
        raise UserError(f"{flag} {path} is not a checkpoint of this project; pass one written by {script}")
    if checkpoint["script"] != script:
        raise UserError(f"{flag} {path} was written by {checkpoint['script']}; load it with that script, not {script}")
    return checkpoint


def follow_checkpoint(args, checkpoint: dict, keys: tuple) -> None:
    """The checkpoint's flags among keys are this run's: evaluation takes them, resuming must repeat them (a flag newer
    than the checkpoint counts as its default)."""
    for key in keys:
        value = checkpoint["args"].get(key, getattr(type(args), key))
        if args.eval_checkpoint:
            setattr(args, key, value)
        elif value != getattr(args, key):
            raise UserError(f"--resume: the checkpoint trained with --{key.replace('_', '-')} {value}; pass that")


def open_run(args, hyperparameters: dict) -> str:
    """Make the run's folder and return it: a new one under runs/, or a resumed run's own (its curves go on there);
    with --track, the run and its hyperparameters are logged to Weights and Biases as well."""
    if args.resume:
        run_dir = os.path.dirname(os.path.abspath(args.resume))
    else:
        name = f"{args.env_id.replace(':', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join("runs", name)
    os.makedirs(run_dir, exist_ok=True)
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=hyperparameters,
            name=os.path.basename(run_dir),
            dir=run_dir,
            save_code=True,
        )
    return run_dir


def load_agent(agent: Agent, checkpoint: dict, flag: str) -> None:
    try:
        agent.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError):
        raise UserError(
            f"{flag}: the checkpoint's network does not fit {checkpoint['args']['env_id']}'s spaces"
        ) from None


def parse_args() -> Args:
    """The flags, by tyro. A value it cannot parse ends as every other mistake does: one line (tyro draws a box)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = tyro.cli(Args)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        box = [line.strip("│ ") for line in stderr.getvalue().splitlines()[1:]]
        message = " ".join(itertools.takewhile(lambda line: line and not line.startswith("─"), box)).rstrip(".")
        hint = [box[i + 1].split()[0] for i, line in enumerate(box[:-1]) if line == "Perhaps you meant:"]
        raise UserError(message + (f" (did you mean {hint[0]}?)" if hint else "") + "; see --help") from None
    sys.stderr.write(stderr.getvalue())
    return args


def main(args: Args) -> None:
    script = os.path.basename(__file__)
    validate_args(args)
    checkpoint = None
    if args.eval_checkpoint or args.resume:
        flag = "--eval-checkpoint" if args.eval_checkpoint else "--resume"
        checkpoint = load_checkpoint(args.eval_checkpoint or args.resume, flag, script)
        follow_checkpoint(args, checkpoint, ("env_id",))  # the game
    check_atari_id(args.env_id)
    device = choose_device(args.cuda)
    # The Nature CNN runs on every core (torch's default): unlike ppo.py's small MLP, convolutions parallelise well.
    # bfloat16 on a CPU only where oneDNN supports it (AVX-512, AMX): elsewhere it would be emulated, slower.
    bf16 = args.bf16 and (device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    tolerance = BF16_ROLLOUT_TOLERANCE if bf16 else ROLLOUT_TOLERANCE

    if args.eval_checkpoint:
        envs = make_envs(args.env_id, 1, args.seed)
        agent = Agent(envs.single_observation_space, envs.single_action_space, bf16).to(device)
        envs.close()
        load_agent(agent, checkpoint, "--eval-checkpoint")
        video_folder = os.path.join(os.path.dirname(args.eval_checkpoint), "videos") if args.capture_video else None
        run_evaluation(agent, args, args.seed, video_folder)
        return

    batch_size = args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    global_step = checkpoint["global_step"] if checkpoint else 0
    start_iteration = global_step // batch_size + 1
    if start_iteration > num_iterations:
        raise UserError(f"--resume: the checkpoint is at step {global_step:,} already; raise --total-timesteps")
    # A resumed run reseeds from the step it resumes at, so it does not replay the episodes of its start.
    seed = args.seed + global_step
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    envs = make_envs(args.env_id, args.num_envs, seed)
    agent = Agent(envs.single_observation_space, envs.single_action_space, bf16).to(device)
    policy = torch_policy(agent, device)
    # Fused Adam: one kernel for every parameter instead of a loop of small ones (README, Speed).
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    if checkpoint:
        load_agent(agent, checkpoint, "--resume")
        optimizer.load_state_dict(checkpoint["optimizer"])
    run_dir = open_run(args, asdict(args))
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    )

    # Rollout storage, [num_steps, num_envs, ...]; frames as uint8 in channels-last memory ([.., height, width,
    # stack]), the layout the CNN reads fastest, which torch views as [.., stack, height, width] (a permute, no copy)
    stack, height, width = envs.single_observation_space.shape
    obs = np.zeros((args.num_steps, args.num_envs, height, width, stack), dtype=np.uint8)
    actions = np.zeros((args.num_steps, args.num_envs), dtype=np.int64)
    logprobs = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    values = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    truncations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    resets = np.zeros((args.num_steps, args.num_envs), dtype=bool)

    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    # Training episodes end at every lost life; `lives` marks the reset steps that follow them. `games` keeps the
    # statistics of whole games.
    lives, games, recent_returns = EpisodeTracker(args.num_envs), EpisodeTracker(args.num_envs), deque(maxlen=100)
    progress = Progress(args.total_timesteps, global_step)
    next_obs, _ = envs.reset()
    start_time, start_step = time.time(), global_step

    for iteration in range(start_iteration, num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / num_iterations
            for group in optimizer.param_groups:  # each group from its own initial lr, as torch's schedulers
                group["lr"] = frac * group.setdefault("initial_lr", group["lr"])

        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs.transpose(0, 2, 3, 1)
            resets[step] = lives.reset
            actions[step], logprobs[step], values[step] = policy(obs[step].transpose(0, 3, 1, 2))

            next_obs, rewards[step], terminations[step], truncations[step], info = envs.step(actions[step])
            lives.step(rewards[step], terminations[step], truncations[step])
            for episode_return, episode_length in track_games(games, info, truncations[step]):
                recent_returns.append(episode_return)
                writer.add_scalar("charts/episodic_return", episode_return, global_step)
                writer.add_scalar("charts/episodic_length", episode_length, global_step)

        with torch.no_grad():
            next_value = agent.get_value(torch.from_numpy(next_obs).to(device)).cpu().numpy()
        check_finite(iteration, observations=obs, rewards=rewards)
        advantages, returns = compute_gae(
            rewards, values, terminations, truncations, resets, next_value, args.gamma, args.gae_lambda
        )

        # Train only on real transitions: the reset steps of next-step autoreset are left out of the batch.
        transition = ~resets.reshape(-1)
        b_obs = torch.from_numpy(obs.reshape(-1, height, width, stack)[transition]).to(device).permute(0, 3, 1, 2)
        b_actions, b_logprobs, b_advantages, b_returns, b_values = (
            torch.from_numpy(x.reshape(-1)[transition]).to(device)
            for x in (actions, logprobs, advantages, returns, values)
        )

        stats, num_updates = {}, 0  # each loss statistic, by name, summed over the minibatches
        for epoch in range(args.update_epochs):
            for mb_inds in torch.randperm(len(b_obs), device=device).tensor_split(args.num_minibatches):
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
                if num_updates == 0:  # nothing has moved the network since the rollout: it must give the same numbers
                    check_rollout(newlogprob, b_logprobs[mb_inds], newvalue, b_values[mb_inds], iteration, tolerance)
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

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
                minibatch = {"policy_loss": pg_loss, "value_loss": v_loss, "entropy": entropy_loss}
                minibatch |= {"old_approx_kl": old_approx_kl, "approx_kl": approx_kl, "clipfrac": clipfrac}
                stats = {key: stats.get(key, 0) + value.detach() for key, value in minibatch.items()}
                num_updates += 1

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        # Losses are averaged over every minibatch of the iteration, not taken from the last one.
        losses = {key: (value / num_updates).item() for key, value in stats.items()}
        check_finite(iteration, **losses)
        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        sps = (global_step - start_step) / (time.time() - start_time)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for key, value in losses.items():
            writer.add_scalar(f"losses/{key}", value, global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", int(sps), global_step)

        if args.save_interval and iteration % args.save_interval == 0 or iteration == num_iterations:
            save_checkpoint(
                checkpoint_path,
                {
                    "script": script,
                    "args": asdict(args),
                    "global_step": global_step,
                    "model": agent.state_dict(),
                    "optimizer": optimizer.state_dict(),
                },
            )
        ret = f"{np.mean(recent_returns):.1f} (last {len(recent_returns)} games)" if recent_returns else "n/a"
        progress.update(global_step, f"{sps:,.0f} SPS | return {ret}")

    envs.close()
    progress.close()
    mean_return = f"{np.mean(recent_returns):.2f}" if recent_returns else "n/a"
    print(
        f"done: {global_step:,} steps in {time.time() - start_time:.1f} s ({sps:,.0f} SPS); "
        f"mean return of the last {len(recent_returns)} games {mean_return}; checkpoint {checkpoint_path}"
    )

    if args.eval_episodes:
        video_folder = os.path.join(run_dir, "videos") if args.capture_video else None
        eval_returns = run_evaluation(agent, args, seed, video_folder)
        writer.add_scalar("eval/episodic_return", np.mean(eval_returns), global_step)
    writer.close()
    if args.track:
        import wandb

        wandb.finish()


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
