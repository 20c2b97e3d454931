"""Data-parallel PPO over MPI ranks, for discrete and continuous actions: the successor of Stable Baselines' PPO1.

A copy of ppo.py, the reference script of this project, joined with ppo_continuous.py where the two differ (a
categorical policy for Discrete, MultiDiscrete and MultiBinary actions; for Box actions a Gaussian policy with
observation and reward normalisation), and spread over MPI ranks. Each rank steps its own vector envs and computes
the gradient of its own minibatch; the gradients are averaged over the ranks in one Allreduce per minibatch, so every
rank takes the same optimizer step and holds the same network, bit for bit (checked at the end of training). Rank 0
broadcasts the initial network, writes the logs, checkpoints and videos, and gathers every rank's episodes. For Box
actions the normalisation statistics are fixed during a rollout and updated after it with the observations and
returns of every rank, so every rank normalises identically (PPO1 does the same). envpool's Atari games get
ppo_atari.py's code: its preprocessing, whole-game scores and Nature CNN (in bfloat16 where the hardware has it).
`--total-timesteps` counts the steps of all ranks, `--num-envs` the envs of one rank; with `--cuda` the ranks of a
host take its GPUs in turn. The learning-rate schedules are Stable Baselines' (`--lr-schedule`).

Paper: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347
Details: Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization", ICLR blog track.

    mpiexec -n 2 python ppo_mpi.py --env-id CartPole-v1        # 2 ranks on this machine (MPICH from requirements.txt)
    mpiexec -f hostfile -n 8 python ppo_mpi.py --env-id Acrobot-v1 --lr-schedule middle_drop  # across hosts
    mpiexec -n 2 python ppo_mpi.py --env-id HalfCheetah-v4 --num-envs 1 --num-steps 2048 --num-minibatches 32 \\
        --update-epochs 10 --learning-rate 3e-4 --ent-coef 0                # ppo_continuous.py's MuJoCo settings
    mpiexec -n 2 python ppo_mpi.py --env-id Breakout-v5 --clip-coef 0.1 \\
        --total-timesteps 10000000                                  # ppo_atari.py's settings, its 8 envs on 2 ranks
    python ppo_mpi.py                                          # one rank, no mpiexec needed
"""

import contextlib
import copy
import hashlib
import importlib
import io
import itertools
import math
import os
import random
import sys
import time
import traceback
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from typing import Literal

import envpool
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from mpi4py import MPI
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment, part of the run folder's name"""
    seed: int = 1
    """seed of random, numpy, torch and the environments (each rank derives its own from it)"""
    cuda: bool = False
    """if toggled, the network trains on the GPU (CUDA) where there is one; a 64x64 MLP trains faster on the CPU"""
    track: bool = False
    """if toggled, log the run to Weights and Biases as well"""
    wandb_project_name: str = "ppo"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """if toggled, record videos of the evaluation episodes under the run folder (`videos/`)"""
    save_interval: int = 0
    """also write the checkpoint every this many iterations (0: only at the end of training)"""
    eval_episodes: int = 10
    """greedy-policy episodes (most likely or mean action) played on rank 0 after training and by --eval-checkpoint
    (0: no evaluation)"""
    eval_checkpoint: str | None = None
    """evaluate the checkpoint at this path with the greedy policy on rank 0, then exit without training"""
    resume: str | None = None
    """continue the run of the checkpoint at this path, on any number of ranks (weights, optimizer, normalisation,
    global step, lr schedule)"""

    # Algorithm specific arguments
    env_id: str = "CartPole-v1"
    """the id of the environment: an envpool id, a gymnasium id, or `module:EnvId-v0` for your own"""
    action_mask: bool = True
    """if toggled, actions the env masks out (its info["action_mask"], e.g. Taxi's) are never taken"""
    mask_velocity: bool = False
    """if toggled, zero the velocities observed in CartPole, Pendulum, Acrobot, MountainCar(Continuous), LunarLander"""
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"
    """who steps the envs; auto takes the faster for CartPole: gymnasium below 16 envs a rank, envpool from 16"""
    total_timesteps: int = 500000
    """total environment steps of the experiment, all envs of all ranks together"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer (at the start of the schedule)"""
    lr_schedule: Literal["constant", "linear", "double_linear_con", "middle_drop", "double_middle_drop"] = "linear"
    """the learning rate over the run, Stable Baselines' schedules: linear decays to 0 (CleanRL's --anneal-lr),
    constant keeps it (--no-anneal-lr); see lr_multiplier for the others"""
    num_envs: int = 4
    """the number of parallel environments of each rank"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    gamma: float = 0.99
    """the discount factor gamma (also of the return whose running std scales the rewards of Box-action tasks)"""
    gae_lambda: float = 0.95
    """the lambda of the general advantage estimation"""
    num_minibatches: int = 4
    """the number of minibatches per update epoch into which each rank splits its own rollout"""
    update_epochs: int = 4
    """the number of epochs over the rollout per update"""
    norm_adv: bool = True
    """if toggled, advantages are normalised per minibatch (each rank's own)"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """if toggled, the value loss is clipped as in the PPO paper's code"""
    ent_coef: float = 0.01
    """the coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """the coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum norm of the gradient averaged over the ranks (clipped above it)"""
    target_kl: float | None = None
    """stop the update epochs early once the approximate KL, averaged over the ranks, passes this (None: never)"""
    bf16: bool = True
    """Atari: if toggled, the CNN computes in bfloat16 (float32 weights, heads, losses) on a GPU or a CPU with it"""


class UserError(Exception):
    """A mistake in the input: printed as one line, exit status 2 (as for a bad flag), no traceback."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())  # one line, whatever it quotes (a 2-D space's repr spans two)


# Envpool warns that reset(seed=) is ignored (its envs are seeded in envpool.make, as make_envs does) and that its
# spaces' float64 bounds become float32: neither applies to a user's run.
warnings.filterwarnings("ignore", message=".*(EnvPool seeds are fixed|precision lowered by casting).*")

# Envpool is faster than gymnasium's SyncVectorEnv from this many CartPoles on (2-core machine, ppo.py's README
# section); for MuJoCo from 8 (ppo_continuous.py): pass --env-backend envpool there.
ENVPOOL_MIN_ENVS = 16

# The velocity entries of the classic control observations, by env name, as RL Zoo's velocity-masked `*NoVel` envs:
# CartPole's cart and pole, Pendulum's and Acrobot's angular ones, MountainCar's, LunarLander's x, y and angular one.
VELOCITY_ENTRIES = {"CartPole": [1, 3], "Pendulum": [2], "Acrobot": [4, 5], "MountainCar": [1]}
VELOCITY_ENTRIES |= {"MountainCarContinuous": [1], "LunarLander": [2, 3, 5], "LunarLanderContinuous": [2, 3, 5]}


def env_name(env_id: str) -> str:
    """`module:ns/CartPole-v1` -> `CartPole`"""
    return env_id.rpartition(":")[2].rpartition("/")[2].rsplit("-v", 1)[0]


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


def validate_args(args: Args, num_ranks: int) -> None:
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
    if args.total_timesteps < num_ranks * batch_size and not args.eval_checkpoint:
        raise UserError(
            f"--total-timesteps {args.total_timesteps} is less than one batch of {num_ranks * batch_size} steps "
            f"({num_ranks} ranks x --num-envs {args.num_envs} x --num-steps {args.num_steps})"
        )
    if not 0 <= args.gamma <= 1 or not 0 <= args.gae_lambda <= 1:
        raise UserError("--gamma and --gae-lambda must lie in [0, 1]")
    if args.eval_checkpoint and args.resume:
        raise UserError("--eval-checkpoint and --resume exclude each other: pass one")
    if args.mask_velocity and not args.eval_checkpoint and env_name(args.env_id) not in VELOCITY_ENTRIES:
        raise UserError(
            f"--mask-velocity: no velocity entries known for {args.env_id}; it takes {', '.join(VELOCITY_ENTRIES)}"
        )


def gymnasium_has(env_id: str) -> bool:
    module, _, name = env_id.rpartition(":")
    try:
        if module:
            importlib.import_module(module)  # gymnasium's `module:EnvId` syntax: the import registers the env
        gym.spec(name)
        return True
    except ModuleNotFoundError as e:
        raise UserError(f"--env-id {env_id}: cannot import module {module!r} ({e})") from None
    except gym.error.Error:
        return False


def choose_backend(env_id: str, num_envs: int, backend: str) -> str:
    """Check that the env id exists and pick who steps it; raises UserError for an unknown id."""
    in_envpool, in_gymnasium = env_id in envpool.list_all_envs(), gymnasium_has(env_id)
    if backend == "auto":
        if not in_envpool and not in_gymnasium:
            raise UserError(f"--env-id {env_id} is neither an envpool nor a gymnasium id (e.g. CartPole-v1)")
        return "envpool" if in_envpool and (num_envs >= ENVPOOL_MIN_ENVS or not in_gymnasium) else "gymnasium"
    if not (in_envpool if backend == "envpool" else in_gymnasium):
        raise UserError(f"--env-id {env_id} is not a {backend} id; try --env-backend auto")
    return backend


def is_atari(env_id: str, backend: str) -> bool:
    spec = envpool.registration.registry.specs.get(env_id)
    return backend == "envpool" and spec is not None and spec[0] == "envpool.atari"


def make_atari_envs(env_id: str, num_envs: int, seed: int, render: bool = False):
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


def frames(obs, info: dict, update: bool = True) -> np.ndarray:
    """Atari's ObsPreparer: envpool's frames go to the CNN as they are (uint8, 4 stacked; scaled inside the network)."""
    return obs


def make_envs(env_id: str, num_envs: int, seed: int, backend: str, video_folder: str | None = None):
    """Vector envs with next-step autoreset, whoever steps them: after a step that ends an episode, the next step
    returns the first observation of the new episode with reward 0 and ignores its action."""
    if backend == "envpool":
        return envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, seed=seed)

    def make_env():
        env = gym.make(env_id, **({"render_mode": "rgb_array"} if video_folder else {}))  # not every env takes it
        if video_folder:
            env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda episode: True)
        return env

    return gym.vector.SyncVectorEnv([make_env] * num_envs, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def observed_space(space: gym.Space) -> gym.Space:
    """The observations the network sees: a Dict of an "observation" and an "action_mask" (PettingZoo's and AgileRL's
    convention for masked actions) is its "observation"; any other space is itself."""
    if isinstance(space, gym.spaces.Dict) and set(space) == {"observation", "action_mask"}:
        return space["observation"]
    return space


def encoded_size(space: gym.Space) -> int:
    """The columns encode_obs gives a space's observations; raises UserError for a space it does not take."""
    if isinstance(space, gym.spaces.Dict | gym.spaces.Tuple):
        return sum(encoded_size(entry) for entry in (space.values() if isinstance(space, gym.spaces.Dict) else space))
    if isinstance(space, gym.spaces.Box | gym.spaces.Discrete | gym.spaces.MultiDiscrete | gym.spaces.MultiBinary):
        return gym.spaces.flatdim(space)
    raise UserError(
        f"the env's observations are {space}: supported are Box, Discrete, MultiDiscrete, MultiBinary, Dict, Tuple"
    )


def encode_obs(space: gym.Space, obs) -> np.ndarray:
    """A batch of observations -> [batch, encoded_size] float32, encoded as SB3 does: Box and MultiBinary as floats,
    Discrete and MultiDiscrete one-hot per component, the entries of a Dict or Tuple concatenated in order."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([encode_obs(entry, obs[key]) for key, entry in space.items()], 1)
    if isinstance(space, gym.spaces.Tuple):
        return np.concatenate([encode_obs(entry, part) for entry, part in zip(space, obs)], 1)
    if isinstance(space, gym.spaces.Discrete | gym.spaces.MultiDiscrete):
        nvec = np.reshape(space.n if isinstance(space, gym.spaces.Discrete) else space.nvec, -1)
        # each component's category, offset by the sizes of the components before it
        index = np.reshape(obs, (len(obs), -1)) - np.reshape(space.start, -1) + np.cumsum(nvec) - nvec
        onehot = np.zeros((len(obs), int(nvec.sum())), np.float32)
        np.put_along_axis(onehot, index.astype(np.int64), 1, axis=1)
        return onehot
    return np.reshape(obs, (len(obs), -1)).astype(np.float32, copy=False)


def velocity_mask(args: Args, obs_space: gym.Space) -> np.ndarray | None:
    """With --mask-velocity, the factor that zeroes the velocity entries of an observation (a partially observable
    task, for comparison with ppo_lstm.py); None otherwise."""
    if not args.mask_velocity:
        return None
    mask = np.ones(obs_space.shape, np.float32)
    mask[VELOCITY_ENTRIES[env_name(args.env_id)]] = 0
    return mask


def action_nvec(space: gym.Space) -> np.ndarray:
    """Every supported discrete action space as independent categorical components: their sizes."""
    if isinstance(space, gym.spaces.Discrete):
        return np.array([space.n])
    if isinstance(space, gym.spaces.MultiDiscrete):
        return space.nvec.reshape(-1)
    if isinstance(space, gym.spaces.MultiBinary):
        return np.full(int(np.prod(space.shape)), 2)
    raise UserError(f"ppo_mpi.py handles Box, Discrete, MultiDiscrete and MultiBinary actions, not {space}")


def to_env_action(action: np.ndarray, space: gym.Space) -> np.ndarray:
    """[num_envs, ...] actions as the rollout stores them -> the env's own action layout. Box: the Gaussian sample,
    clipped to the bounds (only the env sees the clipped action: the rollout trains on the sample, whose
    log-probability the Gaussian gives). Discrete family: category indices, offset by the space's start."""
    if isinstance(space, gym.spaces.Box):
        return np.clip(action.reshape(len(action), *space.shape), space.low, space.high)
    return action.reshape(len(action), *space.shape) + getattr(space, "start", 0)


# log sqrt(2 pi), the constant of the Gaussian's log-density and entropy
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def choose_device(cuda: bool) -> torch.device:
    if cuda and not torch.cuda.is_available():
        print("note: --cuda: torch sees no CUDA device here; running on the CPU")
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """ppo.py's categorical agent for the discrete action spaces, ppo_continuous.py's Gaussian one for Box actions:
    the same 64x64 tanh actor and critic, with one head or the other."""

    def __init__(self, obs_space: gym.Space, act_space: gym.Space):
        super().__init__()
        self.continuous = isinstance(act_space, gym.spaces.Box)
        # observations arrive encoded as flat float vectors (ObsPreparer), any action mask after them
        self.obs_cols = obs_dim = encoded_size(observed_space(obs_space))
        if self.continuous:
            # the Gaussian's mean, one number per action dimension
            self.action_size = num_outputs = int(np.prod(act_space.shape))
        else:
            nvec = action_nvec(act_space)
            # Components of unequal size share one [components, max size] logits table; the padding gets a logit so
            # low that its probability is exactly 0 in float32, so one vectorised softmax serves every component.
            self.logits_shape = (len(nvec), int(nvec.max()))
            self.action_size, num_outputs = len(nvec), len(nvec) * int(nvec.max())
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, num_outputs), std=0.01),
        )
        if self.continuous:
            # a log-std per action dimension, independent of the state (PPO paper, CleanRL), starting at 0: std 1
            self.actor_logstd = nn.Parameter(torch.zeros(1, self.action_size))
        else:
            padding = torch.arange(self.logits_shape[1]) >= torch.as_tensor(nvec)[:, None]
            self.register_buffer("logit_padding", padding.float() * -1e8 if padding.any() else None)
            # An env's action mask is flat over the components; mask_slots are its entries' places in the logits table.
            self.register_buffer("mask_slots", torch.nonzero(~padding.view(-1)).squeeze(1), persistent=False)

    def features(self, x):
        return x[:, : self.obs_cols]  # without the action mask ObsPreparer may append

    def allowed(self, x):
        """The [batch, components, max size] table of the actions the env allows, from the flat action mask
        ObsPreparer appends to the observations; None where there is none."""
        if x.shape[1] == self.obs_cols:
            return None
        table = torch.zeros(len(x), self.logits_shape[0] * self.logits_shape[1], dtype=torch.bool, device=x.device)
        table[:, self.mask_slots] = x[:, self.obs_cols :] > 0.5
        return table.view(len(x), *self.logits_shape)

    def get_value(self, x):
        return self.critic(self.features(x)).squeeze(-1)

    def get_action_and_value(self, x, action=None, greedy=False):
        # Distributions' maths written out: torch.distributions objects cost more than the network at this size.
        allowed, x = None if self.continuous else self.allowed(x), self.features(x)
        if self.continuous:
            action_mean, action_std = self.actor(x), self.actor_logstd.exp()
            if action is None:
                action = action_mean if greedy else action_mean + action_std * torch.randn_like(action_mean)
            logprob = (-0.5 * ((action - action_mean) / action_std).square() - self.actor_logstd - HALF_LOG_2PI).sum(-1)
            entropy = (0.5 + HALF_LOG_2PI + self.actor_logstd).sum(-1).expand(len(x))
        else:
            logits = self.actor(x).view(len(x), *self.logits_shape)
            if self.logit_padding is not None:
                logits = logits + self.logit_padding
            if allowed is not None:  # as the padding: a masked action's probability is exactly 0 in float32
                logits = logits.masked_fill(~allowed, -1e8)
            logp = logits.log_softmax(-1)
            if action is None:
                # Gumbel-max: argmax(logp + Gumbel noise) samples the categorical, in fewer ops than torch.multinomial
                action = logp if greedy else logp - torch.empty_like(logp).exponential_().log()
                action = action.argmax(-1)
            logprob = logp.gather(-1, action.unsqueeze(-1)).squeeze(-1).sum(-1)
            entropy = -(logp.exp() * logp).sum((-2, -1))
        return action, logprob, entropy, self.critic(x).squeeze(-1)


class AtariAgent(nn.Module):
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


def numpy_module(module: nn.Module):
    """module as a NumPy function over views of its parameters' memory, so that it follows every in-place optimizer
    step; None where it holds a layer this mirror does not know (the rollout then runs the torch network)."""
    if isinstance(module, nn.Sequential):
        layers = [numpy_module(layer) for layer in module]
        if None in layers:
            return None

        def sequential(x):
            for layer in layers:
                x = layer(x)
            return x

        return sequential
    param = {name: p.detach().numpy() for name, p in module.named_parameters(recurse=False)}
    if isinstance(module, nn.Linear):
        weight, bias = param["weight"].T, param.get("bias", 0)
        return lambda x: x @ weight + bias
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        weight, bias, eps = param.get("weight", 1), param.get("bias", 0), module.eps
        return lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * weight + bias
    if isinstance(module, nn.LeakyReLU):
        slope = module.negative_slope
        return lambda x: np.where(x > 0, x, slope * x)
    if isinstance(module, nn.ELU):
        alpha = module.alpha
        return lambda x: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))
    # the sigmoid as 0.5 (1 + tanh(x / 2)): the same function, without exp's overflow for large -x
    activations = {nn.Tanh: np.tanh, nn.ReLU: lambda x: np.maximum(x, 0), nn.Identity: lambda x: x}
    activations |= {
        nn.Sigmoid: lambda x: 0.5 + 0.5 * np.tanh(0.5 * x),
        nn.SiLU: lambda x: x * (0.5 + 0.5 * np.tanh(0.5 * x)),
    }
    return activations.get(type(module))


def numpy_policy(agent: Agent, rng: np.random.Generator):
    """The rollout's sampling written in NumPy, derived from the agent's actor and critic: at a few envs a torch forward
    is dozens of small ops, each paying its dispatch, and this runs faster per env step. obs -> (action, logprob,
    value), as get_action_and_value; None where the actor or critic holds a layer numpy_module does not know."""
    actor, critic = numpy_module(agent.actor), numpy_module(agent.critic)
    if actor is None or critic is None:
        return None
    if agent.continuous:
        logstd = agent.actor_logstd.detach().numpy()
    else:
        padding = None if agent.logit_padding is None else agent.logit_padding.numpy()
        categories = np.arange(agent.logits_shape[1])  # for the sampled action's log-probability
        slots, table_size = agent.mask_slots.cpu().numpy(), int(np.prod(agent.logits_shape))
    cols = agent.obs_cols

    def policy(obs):
        x = obs[:, :cols]
        if agent.continuous:
            noise = rng.standard_normal((len(x), logstd.shape[-1]), dtype=np.float32)
            action = actor(x) + np.exp(logstd) * noise
            # the Gaussian log-density at the sample, where (action - mean) / std is the noise, over all dimensions
            logprob = (-0.5 * np.square(noise) - logstd - HALF_LOG_2PI).sum(-1)
        else:
            logits = actor(x).reshape(len(x), *agent.logits_shape)
            if padding is not None:
                logits = logits + padding
            if obs.shape[1] > cols:  # an action mask follows the observation (Agent.allowed)
                allowed = np.zeros((len(x), table_size), dtype=bool)
                allowed[:, slots] = obs[:, cols:] > 0.5
                logits = np.where(allowed.reshape(logits.shape), logits, np.float32(-1e8))
            logits = logits - logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            action = (logp - np.log(rng.standard_exponential(logp.shape, dtype=np.float32))).argmax(-1)
            logprob = (logp * (categories == action[..., None])).sum((-2, -1))
        return action, logprob, critic(x)[:, 0]

    return policy


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


def rollout_policy(agent: Agent, rng: np.random.Generator, device: torch.device, probe: np.ndarray):
    """The policy the rollout samples from: numpy_policy on the CPU where it reproduces get_action_and_value on the
    probe observations, with the agent's weights and with randomly perturbed ones (a module the mirror does not see
    may change nothing until it is trained, e.g. a branch initialised to zero); else the torch network itself."""
    policy = numpy_policy(agent, rng) if device.type == "cpu" else None
    if policy is not None:
        twin, noise = copy.deepcopy(agent), torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=noise))
        try:
            mismatch = ""
            for network, mirror in ((agent, policy), (twin, numpy_policy(twin, rng))):
                action, logprob, value = mirror(probe)
                with torch.no_grad():
                    _, newlogprob, _, newvalue = network.get_action_and_value(*map(torch.from_numpy, (probe, action)))
                mismatch = mismatch or rollout_mismatch(newlogprob, logprob, newvalue, value)
        except Exception as e:  # an edited network the mirror cannot even run, e.g. other input sizes
            mismatch = f"it fails with {type(e).__name__}"
        if mismatch:
            print(f"note: the NumPy rollout cannot follow this Agent ({mismatch}): the rollout runs the torch network")
            policy = None
    return policy or torch_policy(agent, device)


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


class RunningMeanStd:
    """Mean and variance of every batch passed to update(), merged batch by batch with Chan et al.'s parallel
    algorithm (as baselines' VecNormalize). The count starts at a tiny epsilon, as there, so that the empty start
    (mean 0, var 1) weighs nothing yet no division is by zero."""

    def __init__(self, shape=(), epsilon=1e-4):
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), epsilon

    def update(self, x: np.ndarray) -> None:
        """Merge in a batch x of shape [n, *shape]; an empty batch changes nothing."""
        if len(x):
            # the batch's mean and variance from sums: the numbers of x.mean(0) and x.var(0), in fewer passes
            batch_mean = x.sum(0) / len(x)
            self.merge(batch_mean, np.square(x - batch_mean).sum(0) / len(x), len(x))

    def merge(self, mean, var, count) -> None:
        delta, total = mean - self.mean, self.count + count
        self.mean = self.mean + delta * (count / total)
        self.var = (self.var * self.count + var * count + np.square(delta) * (self.count * count / total)) / total
        self.count = total

    def state_dict(self) -> dict:
        """Plain tensors and a float, so that torch.load(weights_only=True) reads them."""
        return {
            "mean": torch.from_numpy(np.array(self.mean)),
            "var": torch.from_numpy(np.array(self.var)),
            "count": self.count,
        }

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"].numpy(), state["var"].numpy(), float(state["count"])


class ObsNormalizer(RunningMeanStd):
    """Observations -> (obs - mean) / std over every observation seen so far, clipped to +-clip (baselines'
    VecNormalize, CleanRL's NormalizeObservation), as float32. update=False freezes the statistics (evaluation)."""

    def __init__(self, shape, clip=10.0, epsilon=1e-8):
        super().__init__(shape)
        self.clip, self.epsilon = clip, epsilon

    def __call__(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        if update:
            self.update(obs)
        return ((obs - self.mean) / np.sqrt(self.var + self.epsilon)).clip(-self.clip, self.clip).astype(np.float32)


class ReturnScaler(RunningMeanStd):
    """Rewards -> reward / std of the discounted return, clipped to +-clip (baselines' VecNormalize, CleanRL's
    NormalizeReward): a scale for the losses only; episode returns are logged from the real rewards. Under next-step
    autoreset the reset step is no transition: it restarts its env's discounted return and is left out of the
    statistics."""

    def __init__(self, num_envs, gamma, clip=10.0, epsilon=1e-8):
        super().__init__()
        self.returns, self.gamma, self.clip, self.epsilon = np.zeros(num_envs), gamma, clip, epsilon

    def __call__(self, reward: np.ndarray, reset: np.ndarray) -> np.ndarray:
        """reward of one vector step; reset: which envs' step was the reset step."""
        self.returns = (self.returns * self.gamma + reward) * ~reset
        self.update(self.returns[~reset])
        return (reward / np.sqrt(self.var + self.epsilon)).clip(-self.clip, self.clip).astype(np.float32)


def lr_multiplier(schedule: str, progress: float) -> float:
    """The factor of --learning-rate once `progress` (0 to 1) of the run's steps are done: Stable Baselines' schedules
    (PPO1's and A2C's `lr_schedule`, defined in openai/baselines' baselines/a2c/utils.py). constant: 1. linear: from 1
    to 0. double_linear_con: twice as steep, then held at 0.125 from 7/16 of the run on. middle_drop: linear for the
    first quarter, then 0.075. double_middle_drop: as middle_drop, then 0.125 for the last quarter (baselines'
    definition: the rate rises again there)."""
    remaining = 1.0 - progress
    if schedule == "linear":
        return remaining
    if schedule == "double_linear_con":
        return max(1.0 - 2.0 * progress, 0.125)
    if schedule == "middle_drop":
        return remaining if remaining >= 0.75 else 0.075
    if schedule == "double_middle_drop":
        return remaining if remaining >= 0.75 else 0.075 if remaining >= 0.25 else 0.125
    return 1.0


@contextlib.contextmanager
def on_every_rank(comm: MPI.Comm):
    """Set-up that every rank runs and that a user's input can make fail: if it raises UserError on any rank, every
    rank exits with status 2 once all have run it, and rank 0 prints the first failing rank's line. A bad flag fails on
    every rank alike; a checkpoint or env missing on one host, on that host's ranks only. The block must make no
    collective call: a failing rank leaves it early, and would leave the others waiting in that call."""
    error = None
    try:
        yield
    except UserError as e:
        error = str(e)
    errors = comm.allgather(error)
    failed = [rank for rank, e in enumerate(errors) if e is not None]
    if failed:
        if comm.rank == 0:
            where = "" if len(failed) == comm.size else f"rank {failed[0]}: "
            print(f"error: {where}{errors[failed[0]]}", file=sys.stderr, flush=True)
        sys.exit(2)


def check_launcher(comm: MPI.Comm, environ: dict) -> None:
    """Raise UserError if the launcher started several processes but MPI sees each alone: mpiexec of another MPI than
    mpi4py's library (e.g. a system Open MPI's) starts N unrelated single-rank runs. The launcher's own variables
    (Open MPI's; PMI's, set by MPICH's Hydra) say how many processes it started."""
    started = int(environ.get("OMPI_COMM_WORLD_SIZE") or environ.get("PMI_SIZE") or comm.size)
    if started > comm.size:
        raise UserError(
            f"mpiexec started {started} processes, but MPI sees {comm.size} rank(s) in each: that mpiexec is not "
            f"of mpi4py's MPI ({' '.join(MPI.Get_library_version().split()[:3])}); launch with the mpiexec "
            f"beside this Python, {os.path.join(os.path.dirname(sys.executable), 'mpiexec')}"
        )


def merge_across_ranks(comm: MPI.Comm, rms: RunningMeanStd, x: np.ndarray) -> None:
    """Merge the batches x ([n, *shape], n may differ between ranks) of every rank into rms as one batch, leaving the
    same statistics on every rank: two Allreduces give the count and sum, then the squared deviations from the union's
    mean (exact in two passes), and RunningMeanStd.merge adds the union's mean and variance to the running ones."""
    sums = np.concatenate([[len(x)], x.sum(0, dtype=np.float64).reshape(-1)])
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    count = int(sums[0])  # a Python number: the checkpoint holds it, and weights_only loading takes no NumPy scalar
    mean = (sums[1:] / count).reshape(x.shape[1:])
    squares = np.square(x - mean).sum(0).reshape(-1)
    comm.Allreduce(MPI.IN_PLACE, squares, op=MPI.SUM)
    rms.merge(mean, squares.reshape(x.shape[1:]) / count, count)


def scale_rewards_across_ranks(
    comm: MPI.Comm, return_scaler: ReturnScaler, rewards: np.ndarray, resets: np.ndarray
) -> np.ndarray:
    """This rank's [num_steps, num_envs] rollout rewards scaled by the std of the discounted return over every rank's
    envs. Every rank gathers every rank's rewards and replays them, step by step, through the same ReturnScaler of
    all ranks' envs (rank 0's first): the same numbers in the same order, so the same statistics on every rank, and
    per step what ppo_continuous.py computes for a single process with all these envs."""
    local = np.stack([rewards, resets]).astype(np.float64)
    gathered = np.empty((comm.size, *local.shape))
    comm.Allgather(local, gathered)
    # [ranks, 2, num_steps, num_envs] -> [num_steps, ranks x num_envs], the envs of rank 0, then rank 1, ...
    all_rewards, all_resets = gathered.transpose(1, 2, 0, 3).reshape(2, len(rewards), -1)
    scaled = np.stack([return_scaler(r, d.astype(bool)) for r, d in zip(all_rewards, all_resets)])
    num_envs = rewards.shape[1]
    return scaled[:, comm.rank * num_envs : (comm.rank + 1) * num_envs]


def average_gradients(comm: MPI.Comm, parameters) -> None:
    """Average every parameter's gradient over the ranks, in one Allreduce of their concatenation in host memory
    (whatever the device); a parameter without a gradient on a rank counts as zero there."""
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).cpu().numpy()
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    flat = torch.from_numpy(flat / comm.Get_size()).to(params[0].device)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def differing_ranks(comm: MPI.Comm, arrays: list) -> list:
    """The ranks whose arrays differ, bit for bit, from rank 0's (compared by their SHA-256 digests)."""
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()
    digests = comm.allgather(digest)
    return [rank for rank, d in enumerate(digests) if d != digests[0]]


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


class ObsPreparer:
    """Env observations -> what the agent sees and the rollout stores: velocities zeroed (--mask-velocity), encoded as
    one float32 vector per env (encode_obs), and where the env gives an action mask (info["action_mask"] or a Dict
    observation's, see observed_space; flat over the components as gymnasium's and SB3's), that mask appended: stored
    and replayed with its observation, it gives the update the rollout's distribution."""

    def __init__(self, space: gym.Space, args: Args, action_space: gym.Space):
        self.mask_in_obs, self.space = observed_space(space) is not space, observed_space(space)
        self.velocity_mask = velocity_mask(args, self.space)
        discrete = not isinstance(action_space, gym.spaces.Box)
        self.use_mask, self.mask_size = args.action_mask and discrete, int(discrete and action_nvec(action_space).sum())
        self.masked = None  # whether the env gives masks: its first observations (a reset) tell

    def __call__(self, obs, info: dict, update: bool = True) -> np.ndarray:
        """update=False freezes any statistics the preparation keeps (evaluation)."""
        if self.mask_in_obs:
            obs, info = obs["observation"], {"action_mask": obs["action_mask"]}
        if self.velocity_mask is not None:
            obs = obs * self.velocity_mask
        obs = encode_obs(self.space, obs)
        if self.masked is None:
            self.masked = self.use_mask and "action_mask" in info
        if not self.masked:
            return obs
        mask = np.array(info["action_mask"], dtype=np.float32).reshape(len(obs), -1)
        if mask.shape[1] != self.mask_size:
            raise UserError(f"the env's action mask has {mask.shape[1]} entries for {self.mask_size} actions")
        mask[~info.get("_action_mask", np.ones(len(obs), dtype=bool))] = 1  # no mask at this step: all allowed
        return np.concatenate([obs, mask], axis=1)


def evaluate(
    agent: Agent, prepare: ObsPreparer, obs_norm: ObsNormalizer | None, envs, num_episodes: int, seed: int
) -> list:
    """Real episodic returns of num_episodes played with the greedy policy (the most likely action, or the mean
    action), the observations prepared as in training and normalised by the training statistics, frozen, where the
    task has them."""
    next_obs = prepare(*envs.reset(seed=seed), update=False)
    tracker, returns, device = EpisodeTracker(envs.num_envs), [], next(agent.parameters()).device
    while len(returns) < num_episodes:
        if obs_norm is not None:
            next_obs = obs_norm(next_obs, update=False)
        with torch.no_grad():
            x = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
            action = agent.get_action_and_value(x, greedy=True)[0].cpu().numpy()
        next_obs, reward, terminated, truncated, info = envs.step(to_env_action(action, envs.single_action_space))
        next_obs = prepare(next_obs, info, update=False)
        returns += [episode_return for episode_return, _ in tracker.step(reward, terminated, truncated)]
    return returns[:num_episodes]


def evaluate_games(agent: AtariAgent, envs, num_episodes: int, video_folder: str | None = None) -> list:
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


def run_evaluation(
    agent: Agent, obs_norm: ObsNormalizer | None, args: Args, backend: str, seed: int, video_folder: str | None
) -> list:
    """Evaluate on a fresh env (rendered when recording videos: by gymnasium, or by envpool for Atari's whole games)
    and print mean ± std."""
    if is_atari(args.env_id, backend):
        envs = make_atari_envs(args.env_id, 1, seed, render=video_folder is not None)
        returns = evaluate_games(agent, envs, args.eval_episodes, video_folder)
    else:
        envs = make_envs(args.env_id, 1, seed, "gymnasium" if video_folder else backend, video_folder)
        prepare = ObsPreparer(envs.single_observation_space, args, envs.single_action_space)
        returns = evaluate(agent, prepare, obs_norm, envs, args.eval_episodes, seed)
    envs.close()
    print(f"eval {args.env_id}: {np.mean(returns):.2f} ± {np.std(returns):.2f} over {len(returns)} greedy episodes")
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


def main(args: Args, comm: MPI.Comm) -> None:
    script = os.path.basename(__file__)
    rank, num_ranks = comm.rank, comm.size
    host = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this rank's host: with --cuda, one GPU each in turn
    local_rank = host.rank
    host.Free()
    # Only rank 0 reads the checkpoint and sends it to the others: across hosts, it need exist on rank 0's alone.
    checkpoint = None
    with on_every_rank(comm):
        check_launcher(comm, os.environ)
        validate_args(args, num_ranks)
        if rank == 0 and (args.eval_checkpoint or args.resume):
            flag = "--eval-checkpoint" if args.eval_checkpoint else "--resume"
            checkpoint = load_checkpoint(args.eval_checkpoint or args.resume, flag, script)
    checkpoint = comm.bcast(checkpoint, root=0)

    with on_every_rank(comm):
        if checkpoint:
            follow_checkpoint(args, checkpoint, ("env_id", "mask_velocity"))  # the env and its observations
        backend = choose_backend(args.env_id, args.num_envs, args.env_backend)
        atari = is_atari(args.env_id, backend)  # ppo_atari.py's preprocessing, whole-game scores and Nature CNN
        if args.capture_video and args.eval_episodes and not atari and not gymnasium_has(args.env_id):
            raise UserError(f"--capture-video: videos are rendered by gymnasium, which has no env {args.env_id}")
        if args.capture_video and sys.platform == "linux" and not os.environ.get("DISPLAY"):
            os.environ.setdefault("MUJOCO_GL", "egl")  # MuJoCo renders through a window (GLFW) by default: none here
        device = choose_device(args.cuda)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        # bfloat16 on a CPU only where oneDNN supports it (AVX-512, AMX): elsewhere it would be emulated, slower.
        bf16 = atari and args.bf16 and (device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported())
        tolerance = BF16_ROLLOUT_TOLERANCE if bf16 else ROLLOUT_TOLERANCE
        # One CPU thread per rank: at a 64x64 MLP's sizes a second thread's synchronisation costs more than it brings;
        # the ranks are the parallelism here.
        torch.set_num_threads(1)

        # Steps of all ranks per iteration; a resumed run, on any number of ranks, goes on from its global step.
        batch_size = args.num_envs * args.num_steps
        global_batch = num_ranks * batch_size
        global_step = checkpoint["global_step"] if checkpoint and args.resume else 0
        num_iterations = (args.total_timesteps - global_step) // global_batch
        if args.resume and num_iterations < 1:
            raise UserError(
                f"--resume: the checkpoint is at step {global_step:,} already, less than one batch of "
                f"{global_batch:,} steps from --total-timesteps {args.total_timesteps:,}; raise --total-timesteps"
            )
        # Each rank seeds its envs (env i of a vector takes seed + i) after the previous rank's; a resumed run
        # reseeds from the step it resumes at, so it does not replay the episodes of its start.
        seed = args.seed + global_step + rank * args.num_envs
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

        num_envs = 1 if args.eval_checkpoint else args.num_envs
        envs = (
            make_atari_envs(args.env_id, num_envs, seed) if atari else make_envs(args.env_id, num_envs, seed, backend)
        )
        spaces = envs.single_observation_space, envs.single_action_space
        agent = (AtariAgent(*spaces, bf16) if atari else Agent(*spaces)).to(device)
        if checkpoint:
            load_agent(agent, checkpoint, "--eval-checkpoint" if args.eval_checkpoint else "--resume")

    # Box-action tasks normalise observations and scale rewards by running statistics, as ppo_continuous.py.
    normalize = isinstance(envs.single_action_space, gym.spaces.Box)
    obs_shape = (encoded_size(observed_space(envs.single_observation_space)),)  # as ObsPreparer encodes them
    obs_norm = ObsNormalizer(obs_shape) if normalize else None
    return_scaler = ReturnScaler(num_ranks * args.num_envs, args.gamma) if normalize else None
    if checkpoint and normalize:
        obs_norm.load_state_dict(checkpoint["obs_rms"])
        return_scaler.load_state_dict(checkpoint["return_rms"])

    if args.eval_checkpoint:
        envs.close()
        if rank == 0:
            video_folder = os.path.join(os.path.dirname(args.eval_checkpoint), "videos") if args.capture_video else None
            run_evaluation(agent, obs_norm, args, backend, args.seed, video_folder)
        return

    # Every rank starts from rank 0's network (or the checkpoint's, the same everywhere).
    params = nn.utils.parameters_to_vector(agent.parameters()).detach().cpu().numpy()
    comm.Bcast(params, root=0)
    nn.utils.vector_to_parameters(torch.from_numpy(params).to(device), agent.parameters())
    # Fused Adam: one kernel for every parameter instead of a loop of small ones (README, Speed).
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])

    # Logs, checkpoints, videos and progress are rank 0's.
    if rank == 0:
        run_dir = open_run(args, asdict(args) | {"num_ranks": num_ranks})
        writer = SummaryWriter(run_dir)
        hyperparameters = asdict(args) | {"num_ranks": num_ranks}
        writer.add_text(
            "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hyperparameters.items())
        )
        checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    # The agent sees, and the rollout stores, each observation prepared once (velocities masked, action mask appended).
    prepare = frames if atari else ObsPreparer(envs.single_observation_space, args, envs.single_action_space)
    next_obs = prepare(*envs.reset(seed=seed))
    # Rollout storage, [num_steps, num_envs, ...]: observations as the networks saw them (normalised for Box actions;
    # raw_obs: before normalisation, for the statistics; Atari's uint8 frames), real rewards, actions as category
    # indices (Atari's one) or as the Gaussian's unclipped samples
    obs = np.zeros((args.num_steps, *next_obs.shape), dtype=next_obs.dtype)
    raw_obs = np.zeros_like(obs) if normalize else None
    action_shape = () if atari else (agent.action_size,)
    actions = np.zeros((args.num_steps, args.num_envs, *action_shape), dtype=np.float32 if normalize else np.int64)
    logprobs = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    values = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    truncations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    resets = np.zeros((args.num_steps, args.num_envs), dtype=bool)

    tracker, recent_returns = EpisodeTracker(args.num_envs), deque(maxlen=100)
    # Atari: training episodes (tracker) end at every lost life; the statistics are those of whole games (games).
    games = EpisodeTracker(args.num_envs) if atari else None
    progress = Progress(args.total_timesteps, global_step) if rank == 0 else None
    rng = np.random.default_rng(seed)
    if atari:  # the CNN's maths outweigh a forward's dispatch: no NumPy mirror
        policy = torch_policy(agent, device)
    else:
        # Observations the mirror is checked on: random ones of the env's space, prepared as the env's (random
        # action masks appended where the env gives masks).
        samples = gym.vector.utils.batch_space(envs.single_observation_space, 64)
        samples.seed(seed)
        probe = prepare(samples.sample(), {"action_mask": rng.random((64, prepare.mask_size)) < 0.7}, update=False)
        policy = rollout_policy(agent, rng, device, probe)
    start_time, start_step = time.time(), global_step
    final_step = global_step + num_iterations * global_batch

    for iteration in range(1, num_iterations + 1):
        multiplier = lr_multiplier(args.lr_schedule, global_step / final_step)
        for group in optimizer.param_groups:  # each group from its own initial lr, as torch's schedulers
            group["lr"] = multiplier * group.setdefault("initial_lr", group["lr"])

        iteration_start, episodes = global_step, []
        for step in range(args.num_steps):
            global_step += num_ranks * args.num_envs
            if normalize:
                # Fixed during the rollout, the statistics normalise alike on every rank (merged after it).
                raw_obs[step] = next_obs
                obs[step] = obs_norm(next_obs, update=False)
            else:
                obs[step] = next_obs
            resets[step] = tracker.reset
            actions[step], logprobs[step], values[step] = policy(obs[step])

            next_obs, rewards[step], terminations[step], truncations[step], info = envs.step(
                to_env_action(actions[step], envs.single_action_space)
            )
            next_obs = prepare(next_obs, info)
            ended = tracker.step(rewards[step], terminations[step], truncations[step])
            if games:
                ended = track_games(games, info, truncations[step])
            for episode_return, episode_length in ended:
                episodes.append((step, episode_return, episode_length))

        with torch.no_grad():
            last_obs = obs_norm(next_obs, update=False) if normalize else next_obs
            next_value = agent.get_value(torch.as_tensor(last_obs, device=device)).cpu().numpy()
        train_rewards = rewards
        if normalize:
            merge_across_ranks(comm, obs_norm, raw_obs.reshape(-1, *obs_shape))
            train_rewards = scale_rewards_across_ranks(comm, return_scaler, rewards, resets)
        check_finite(iteration, observations=obs, rewards=rewards)
        advantages, returns = compute_gae(
            train_rewards, values, terminations, truncations, resets, next_value, args.gamma, args.gae_lambda
        )

        # Train only on real transitions: the reset steps of next-step autoreset are left out of the batch.
        transition = ~resets.reshape(-1)
        b_obs = torch.from_numpy(obs.reshape(-1, *obs.shape[2:])[transition]).to(device)
        b_actions = torch.from_numpy(actions.reshape(-1, *action_shape)[transition]).to(device)
        b_logprobs, b_advantages, b_returns, b_values = (
            torch.from_numpy(x.reshape(-1)[transition]).to(device) for x in (logprobs, advantages, returns, values)
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
                # Each rank's minibatch weighs the same (PPO1): every rank takes the same step from the same network.
                average_gradients(comm, agent.parameters())
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                minibatch = {"policy_loss": pg_loss, "value_loss": v_loss, "entropy": entropy_loss}
                minibatch |= {"old_approx_kl": old_approx_kl, "approx_kl": approx_kl, "clipfrac": clipfrac}
                stats = {key: stats.get(key, 0) + value.detach() for key, value in minibatch.items()}
                num_updates += 1

            # Decided on the ranks' mean KL, so that all stop after the same epoch (and make the same Allreduces).
            if args.target_kl is not None and comm.allreduce(approx_kl.item()) / num_ranks > args.target_kl:
                break

        # Rank 0 gathers every rank's episodes, losses, values and returns of the iteration.
        rank_losses = {key: (value / num_updates).item() for key, value in stats.items()}
        check_finite(iteration, **rank_losses)
        rank_stats = [rank_losses, b_values.cpu().numpy(), b_returns.cpu().numpy()]
        gathered = comm.gather((episodes, *rank_stats), root=0)
        if rank == 0:
            # Each rank's episode ended at its step `step` of the iteration, when all ranks had made step + 1 steps.
            for step, episode_return, episode_length in sorted(
                e for rank_episodes, *_ in gathered for e in rank_episodes
            ):
                x = iteration_start + (step + 1) * num_ranks * args.num_envs
                recent_returns.append(episode_return)
                writer.add_scalar("charts/episodic_return", episode_return, x)
                writer.add_scalar("charts/episodic_length", episode_length, x)
            # Losses are averaged over every minibatch of the iteration, of every rank; not taken from the last one.
            losses = {key: np.mean([g[1][key] for g in gathered]) for key in rank_losses}
            y_pred, y_true = (np.concatenate([g[i] for g in gathered]) for i in (2, 3))
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
                        "num_ranks": num_ranks,
                        "model": agent.state_dict(),
                        "optimizer": optimizer.state_dict(),
                    }
                    | (
                        {"obs_rms": obs_norm.state_dict(), "return_rms": return_scaler.state_dict()}
                        if normalize
                        else {}
                    ),
                )
            ret = f"{np.mean(recent_returns):.1f} (last {len(recent_returns)} episodes)" if recent_returns else "n/a"
            progress.update(global_step, f"{sps:,.0f} SPS | return {ret}")

    envs.close()
    if progress:
        progress.close()
    # The ranks stay in step only while every Allreduce gives every rank the same numbers: check that they did.
    state = [nn.utils.parameters_to_vector(agent.parameters()).detach().cpu().numpy()]
    state += [v.cpu().numpy() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    state += [obs_norm.mean, obs_norm.var, return_scaler.var] if normalize else []
    differing = differing_ranks(comm, state)
    if rank == 0 and differing:
        print(
            f"error: after training, the network, optimizer or normalisation of rank(s) {differing} differ from rank "
            f"0's: the ranks did not stay in step (checkpoint {checkpoint_path} holds rank 0's); please report this",
            file=sys.stderr,
            flush=True,
        )
    if differing:
        sys.exit(1)
    if rank > 0:
        return

    mean_return = f"{np.mean(recent_returns):.2f}" if recent_returns else "n/a"
    ranks = f"{num_ranks} ranks, identical at the end" if num_ranks > 1 else "1 rank"
    print(
        f"done: {global_step:,} steps in {time.time() - start_time:.1f} s ({sps:,.0f} SPS) on {ranks}; "
        f"mean return of the last {len(recent_returns)} episodes {mean_return}; checkpoint {checkpoint_path}"
    )
    if args.eval_episodes:
        video_folder = os.path.join(run_dir, "videos") if args.capture_video else None
        eval_returns = run_evaluation(agent, obs_norm, args, backend, seed, video_folder)
        writer.add_scalar("eval/episodic_return", np.mean(eval_returns), global_step)
    writer.close()
    if args.track:
        import wandb

        wandb.finish()


def parse_args_on_ranks(comm: MPI.Comm) -> Args:
    """Every rank parses the flags; only rank 0 prints --help or a bad flag's line, and every rank exits alike."""
    with contextlib.ExitStack() as quiet:
        if comm.rank > 0:
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        try:
            return parse_args()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    comm = MPI.COMM_WORLD
    args = parse_args_on_ranks(comm)
    try:
        main(args, comm)
    except UserError as e:  # found while training (the rollout guard, a NaN): one line from each rank that found it
        print(f"error: {e}" if comm.size == 1 else f"error: rank {comm.rank}: {e}", file=sys.stderr, flush=True)
        if comm.size == 1:
            sys.exit(2)
        time.sleep(1.0)  # for mpiexec to pass the line on before MPI_Abort's teardown
        comm.Abort(2)
    except (Exception, KeyboardInterrupt) as e:
        if comm.size == 1:
            raise
        # A rank that stops alone leaves the others waiting in a collective call for ever: MPI_Abort ends them all.
        if not isinstance(e, KeyboardInterrupt):
            traceback.print_exc()
        print(
            f"error: rank {comm.rank} of {comm.size} failed ({type(e).__name__}: {e}); stopping every rank",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(1.0)  # for mpiexec to pass the lines on: MPI_Abort's teardown sometimes loses them without
        comm.Abort(1)
