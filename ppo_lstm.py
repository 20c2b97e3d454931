"""Recurrent PPO for any environment: ppo.py with an LSTM policy.

A copy of ppo.py, the reference script of this project, with a memory: an encoder chosen from the observation space
(an MLP for vectors, the Nature CNN for images, one of these per entry of a Dict or Tuple), then an LSTM, then the
actor and critic heads (categorical for Discrete, MultiDiscrete and MultiBinary actions, Gaussian for Box actions).
The LSTM state is carried through the rollout and restarts at each episode's first observation; the training pass
replays whole env sequences from the state at the start of the rollout, so a minibatch is a set of whole envs.
`--mask-velocity` hides the velocities of the classic control tasks, which then need the memory. The defaults are
CleanRL's classic-control settings (ppo.py's) with a 128-unit LSTM (CleanRL's ppo_atari_lstm.py): a recurrent task
learns with its own settings, as below (RL Zoo's tuned ones, plus reward scaling: see README and `benchmark.sh
--preset recurrent`).

Paper: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347
Details: Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization", ICLR blog track.

    python ppo_lstm.py --env-id CartPole-v1 --total-timesteps 5000        # any env: vectors, images, Dicts
    # partially observable CartPole, 100k steps: a greedy return of 500 (5 seeds of 6; the sixth 468)
    python ppo_lstm.py --env-id CartPole-v1 --mask-velocity --total-timesteps 100000 --num-envs 8 --num-steps 32 \
        --num-minibatches 1 --update-epochs 20 --learning-rate 1e-3 --gamma 0.98 --gae-lambda 0.8 --ent-coef 0 \
        --lstm-hidden-size 64 --norm-obs --norm-reward
    # partially observable Pendulum, 100k steps, gSDE exploration: a greedy return of about -180
    python ppo_lstm.py --env-id Pendulum-v1 --mask-velocity --total-timesteps 100000 --num-envs 4 --num-steps 1024 \
        --seq-len 64 --num-minibatches 64 --update-epochs 10 --learning-rate 1e-3 --gamma 0.9 --ent-coef 0 \
        --norm-obs --norm-reward --gsde --sde-sample-freq 4
    ./benchmark.sh --preset recurrent --tasks MountainCar   # masked MountainCarContinuous with gSDE: about 93
    # CleanRL's ppo_atari_lstm.py settings (its Breakout: 129 at 10M; not run here, it needs a GPU)
    python ppo_lstm.py --env-id Breakout-v5 --num-envs 8 --clip-coef 0.1 --total-timesteps 10000000 --cuda
    python ppo_lstm.py --eval-checkpoint runs/RUN/checkpoint.pt --capture-video
"""

import contextlib
import copy
import importlib
import io
import itertools
import math
import os
import random
import sys
import time
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
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment, part of the run folder's name"""
    seed: int = 1
    """seed of random, numpy, torch and the environments"""
    cuda: bool = False
    """if toggled, the network trains on the GPU (CUDA) where there is one: pass it for images, not for vectors"""
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
    """greedy-policy episodes played after training and by --eval-checkpoint (0: no evaluation)"""
    eval_checkpoint: str | None = None
    """evaluate the checkpoint at this path with the greedy policy, then exit without training"""
    resume: str | None = None
    """continue the run of the checkpoint at this path (weights, optimizer, global step, lr schedule)"""

    # Algorithm specific arguments
    env_id: str = "CartPole-v1"
    """the id of the environment: an envpool id, a gymnasium id, or `module:EnvId-v0` for your own"""
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"
    """who steps the envs; auto takes the faster: gymnasium below 16 envs, envpool from 16 (measured)"""
    total_timesteps: int = 500000
    """total environment steps of the experiment, all envs together"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 4
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
    """the number of minibatches per update epoch; each holds whole sequences (see --seq-len)"""
    seq_len: int = 0
    """the length of the sequences the training pass replays, each from the LSTM state stored at its first step
    (0: the whole rollout of each env; shorter ones allow more minibatches than envs)"""
    update_epochs: int = 4
    """the number of epochs over the rollout per update"""
    norm_adv: bool = True
    """if toggled, advantages are normalised per minibatch"""
    clip_coef: float = 0.2
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
    lstm_hidden_size: int = 128
    """the number of units of the LSTM (its hidden and cell state)"""
    lstm_num_layers: int = 1
    """the number of stacked LSTM layers"""
    action_mask: bool = True
    """if toggled, actions the env masks out (its info["action_mask"], e.g. Taxi's) are never taken"""
    mask_velocity: bool = False
    """if toggled, zero the velocities observed in CartPole, Pendulum, Acrobot, MountainCar(Continuous), LunarLander"""
    norm_obs: bool = False
    """if toggled, normalise Box observations by their running mean and std (continuous tasks: ppo_continuous.py)"""
    norm_reward: bool = False
    """if toggled, scale rewards by the running std of the discounted return (continuous tasks: ppo_continuous.py)"""
    gsde: bool = False
    """if toggled, Box actions explore by gSDE (Raffin et al. 2021): noise linear in the LSTM output, smooth in time"""
    sde_sample_freq: int = 0
    """with --gsde, draw new noise weights every this many steps (0: only at the start of each rollout)"""
    log_std_init: float = 0.0
    """the initial log-std of the Gaussian policy (with --gsde: of each noise weight)"""


class UserError(Exception):
    """A mistake in the input: printed as one line, exit status 2 (as for a bad flag), no traceback."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())  # one line, whatever it quotes (a 2-D space's repr spans two)


# Envpool warns that reset(seed=) is ignored (its envs are seeded in envpool.make, as make_envs does) and that its
# spaces' float64 bounds become float32: neither applies to a user's run.
warnings.filterwarnings("ignore", message=".*(EnvPool seeds are fixed|precision lowered by casting).*")

# Envpool is faster than gymnasium's SyncVectorEnv from this many CartPoles on (2-core machine, see README).
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


def validate_args(args: Args) -> None:
    positive = ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "lstm_hidden_size")
    for flag in (*positive, "lstm_num_layers"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be positive")
    if args.eval_episodes < 0 or args.save_interval < 0:
        raise UserError("--eval-episodes and --save-interval must be 0 or more")
    check_numbers(args)
    batch_size = args.num_envs * args.num_steps
    seq_len = args.seq_len or args.num_steps
    if args.seq_len < 0 or args.num_steps % seq_len:
        raise UserError(f"--seq-len {args.seq_len} does not divide --num-steps {args.num_steps} (0: whole rollouts)")
    num_sequences = args.num_envs * (args.num_steps // seq_len)
    if num_sequences % args.num_minibatches:
        raise UserError(
            f"--num-minibatches {args.num_minibatches} does not divide the {num_sequences} sequences of a rollout "
            f"(--num-envs {args.num_envs} x --num-steps {args.num_steps} / --seq-len {seq_len}): "
            "a minibatch holds whole sequences"
        )
    if args.total_timesteps < batch_size and not args.eval_checkpoint:
        raise UserError(f"--total-timesteps {args.total_timesteps} is less than one batch of {batch_size} steps")
    if not 0 <= args.gamma <= 1 or not 0 <= args.gae_lambda <= 1:
        raise UserError("--gamma and --gae-lambda must lie in [0, 1]")
    if args.eval_checkpoint and args.resume:
        raise UserError("--eval-checkpoint and --resume exclude each other: pass one")
    if args.mask_velocity and not args.eval_checkpoint and env_name(args.env_id) not in VELOCITY_ENTRIES:
        raise UserError(
            f"--mask-velocity: no velocity entries known for {args.env_id}; it takes {', '.join(VELOCITY_ENTRIES)}"
        )
    if args.sde_sample_freq < 0:
        raise UserError(f"--sde-sample-freq must be 0 (each rollout's start) or more, not {args.sde_sample_freq}")
    if not abs(args.log_std_init) < np.inf:
        raise UserError(f"--log-std-init {args.log_std_init} must be a finite number")


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


def make_envs(env_id: str, num_envs: int, seed: int, backend: str, video_folder: str | None = None):
    """Vector envs with next-step autoreset, whoever steps them: after a step that ends an episode, the next step
    returns the first observation of the new episode with reward 0 and ignores its action. Atari games get the
    preprocessing of CleanRL's ppo_atari_lstm.py (ppo_atari.py's, but one frame, not four: the LSTM remembers)."""
    if backend == "envpool":
        atari = dict(
            noop_max=30,
            frame_skip=4,
            img_height=84,
            img_width=84,
            gray_scale=True,
            stack_num=1,
            episodic_life=True,  # a lost life ends the training episode (the state restarts); info keeps the game
            use_fire_reset=True,
            reward_clip=True,  # training rewards clipped to their sign; info["reward"] keeps the real score
            repeat_action_probability=0.0,
            max_episode_steps=27000,  # 108,000 frames
        )
        return envpool.make(
            env_id, env_type="gymnasium", num_envs=num_envs, seed=seed, **(atari if is_atari(env_id, backend) else {})
        )

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


def obs_entries(space: gym.Space) -> list:
    """The entries of a Dict or Tuple observation, in the order encode_obs concatenates them; any other space alone."""
    if isinstance(space, gym.spaces.Dict | gym.spaces.Tuple):
        return list(space.values() if isinstance(space, gym.spaces.Dict) else space)
    return [space]


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
    raise UserError(f"ppo_lstm.py handles Discrete, MultiDiscrete, MultiBinary and Box actions, not {space}")


def to_env_action(action: np.ndarray, space: gym.Space) -> np.ndarray:
    """[num_envs, components] category indices or Gaussian samples -> the env's own action layout and offset, Box
    actions clipped to their bounds. Only the env sees the clipped action: the rollout stores and trains on the sample,
    whose log-probability the Gaussian gives."""
    if isinstance(space, gym.spaces.Box):
        return np.clip(action.reshape(len(action), *space.shape), space.low, space.high)
    return action.reshape(len(action), *space.shape) + getattr(space, "start", 0)


def is_image(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3


# log sqrt(2 pi), the constant of the Gaussian's log-density and entropy
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
SDE_EPS = 1e-6  # added to gSDE's variance: a latent of zeros would give a std of 0


def choose_device(cuda: bool) -> torch.device:
    if cuda and not torch.cuda.is_available():
        print("note: --cuda: torch sees no CUDA device here; running on the CPU")
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Encoder(nn.Module):
    """One observation space -> features. Images (uint8, 3 dimensions, the smallest one the channels, first or last)
    go through the Nature CNN, scaled to [0, 1] here; any other space, encoded as a flat vector (encode_obs), through
    a 64x64 tanh MLP as in ppo.py."""

    def __init__(self, space: gym.Space):
        super().__init__()
        self.image, self.shape = is_image(space), space.shape
        if self.image:
            self.hwc = int(np.argmin(space.shape)) == 2  # height, width, channels (else channels first)
            channels, height, width = np.roll(space.shape, 1) if self.hwc else space.shape
            self.net = nn.Sequential(
                layer_init(nn.Conv2d(channels, 32, 8, stride=4)),
                nn.ReLU(),
                layer_init(nn.Conv2d(32, 64, 4, stride=2)),
                nn.ReLU(),
                layer_init(nn.Conv2d(64, 64, 3, stride=1)),
                nn.ReLU(),
                nn.Flatten(),
            )
            try:  # the size of the convolutions' output, for this image size
                conv_size = self.net(torch.zeros(1, channels, height, width)).shape[1]
            except RuntimeError:
                raise UserError(f"images of shape {space.shape} are smaller than the Nature CNN's 36x36") from None
            self.net.extend([layer_init(nn.Linear(conv_size, 512)), nn.ReLU()])
            self.out_dim = 512
        else:
            self.net = nn.Sequential(
                layer_init(nn.Linear(encoded_size(space), 64)),
                nn.Tanh(),
                layer_init(nn.Linear(64, 64)),
                nn.Tanh(),
            )
            self.out_dim = 64

    def forward(self, x):
        if self.image:
            x = x.view(len(x), *self.shape)  # a Dict's entries arrive flattened
            x = x.permute(0, 3, 1, 2) if self.hwc else x
            # in channels-last memory, the layout that oneDNN's convolutions run fastest in
            return self.net(x.contiguous(memory_format=torch.channels_last) / 255.0)
        return self.net(x)


class Agent(nn.Module):
    def __init__(
        self,
        obs_space: gym.Space,
        act_space: gym.Space,
        lstm_hidden_size: int,
        lstm_num_layers: int,
        gsde: bool = False,
        log_std_init: float = 0.0,
    ):
        super().__init__()
        obs_space = observed_space(obs_space)
        # A Dict or Tuple observation gets one encoder per entry, concatenated; it arrives flattened (ObsPreparer).
        self.obs_spaces = obs_entries(obs_space)
        self.encoders = nn.ModuleList(Encoder(space) for space in self.obs_spaces)
        self.obs_sizes = [encoded_size(space) for space in self.obs_spaces]
        self.obs_cols = sum(self.obs_sizes)  # the columns of an observation before any action mask
        self.lstm = nn.LSTM(sum(e.out_dim for e in self.encoders), lstm_hidden_size, lstm_num_layers)
        for name, param in self.lstm.named_parameters():  # as CleanRL's ppo_atari_lstm.py
            if "bias" in name:
                nn.init.constant_(param, 0)
            else:
                nn.init.orthogonal_(param, 1.0)
        self.critic = layer_init(nn.Linear(lstm_hidden_size, 1), std=1.0)
        self.continuous, self.gsde = isinstance(act_space, gym.spaces.Box), gsde
        if self.continuous:
            # The actor gives the Gaussian's mean; its log-std is one learned number per action dimension, independent
            # of the state (PPO paper, CleanRL). gSDE learns one per (LSTM output, action) pair instead: the noise is
            # the LSTM output times weights of these stds (sample_noise), so its std depends on the state.
            self.action_dim = int(np.prod(act_space.shape))
            self.actor = layer_init(nn.Linear(lstm_hidden_size, self.action_dim), std=0.01)
            rows = lstm_hidden_size if gsde else 1
            self.actor_logstd = nn.Parameter(torch.full((rows, self.action_dim), float(log_std_init)))
        else:
            nvec = action_nvec(act_space)
            self.action_dim = len(nvec)
            self.actor = layer_init(nn.Linear(lstm_hidden_size, len(nvec) * int(nvec.max())), std=0.01)
            # Components of unequal size share one [components, max size] logits table; the padding gets a logit so
            # low that its probability is exactly 0 in float32, so one vectorised softmax serves every component.
            self.logits_shape = (len(nvec), int(nvec.max()))
            padding = torch.arange(self.logits_shape[1]) >= torch.as_tensor(nvec)[:, None]
            self.register_buffer("logit_padding", padding.float() * -1e8 if padding.any() else None)
            # An env's action mask is flat over the components; mask_slots are its entries' places in the logits table.
            self.register_buffer("mask_slots", torch.nonzero(~padding.view(-1)).squeeze(1), persistent=False)

    def initial_state(self, num_envs: int) -> tuple:
        """The LSTM state (h, c) of num_envs envs before their first step: zeros, [layers, envs, hidden size]."""
        shape = (self.lstm.num_layers, num_envs, self.lstm.hidden_size)
        device = self.critic.weight.device
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def encode(self, x):
        if x.dim() == 2 and x.shape[1] > self.obs_cols:  # without the action mask ObsPreparer appended (allowed)
            x = x[:, : self.obs_cols]
        if len(self.encoders) == 1:
            return self.encoders[0](x)
        return torch.cat([encoder(part) for encoder, part in zip(self.encoders, x.split(self.obs_sizes, 1))], 1)

    def get_states(self, x, lstm_state, starts):
        """LSTM outputs for the time-major steps x [T * B, ...] of B envs, from lstm_state (h, c) [layers, B, hidden],
        the state before the first step. starts [T * B] marks each episode's first observation: the state restarts
        from zeros there. Returns the outputs [T * B, hidden] and, for one step (T = 1), the state after it."""
        features = self.encode(x)
        h, c = lstm_state
        if len(features) == h.shape[1]:  # one step of every env: the rollout and evaluation
            if starts.any():  # an episode begins: its env's state restarts from zeros
                keep = (~starts).view(1, -1, 1).float()
                h, c = h * keep, c * keep
            hidden, lstm_state = self.lstm(features.unsqueeze(0), (h, c))
            return hidden[0], lstm_state
        # Whole sequences (the update): each env's sequence is cut at its episode starts into segments, which are
        # padded into one batch for a single LSTM call. The LSTM is causal, so padding at the end changes nothing.
        segments = sequence_segments(starts.view(-1, h.shape[1]).cpu().numpy())
        pad_inds, unpad, seg_env, resume = (torch.from_numpy(a).to(features.device) for a in segments)
        keep = resume.view(1, -1, 1).float()
        hidden, _ = self.lstm(features[pad_inds], (h[:, seg_env] * keep, c[:, seg_env] * keep))
        return hidden.flatten(0, 1)[unpad], None

    def allowed(self, x):
        """The [batch, components, max size] table of the actions the env allows, from the flat action mask
        ObsPreparer appends to vector observations; None where there is none."""
        if self.continuous or x.dim() != 2 or x.shape[1] == self.obs_cols:
            return None
        table = torch.zeros(len(x), self.logits_shape[0] * self.logits_shape[1], dtype=torch.bool, device=x.device)
        table[:, self.mask_slots] = x[:, self.obs_cols :] > 0.5
        return table.view(len(x), *self.logits_shape)

    def get_value(self, x, lstm_state, starts):
        return self.critic(self.get_states(x, lstm_state, starts)[0]).squeeze(-1)

    def sample_noise(self, num_envs: int, rng: np.random.Generator) -> np.ndarray:
        """gSDE's noise weights, one matrix per env [envs, hidden, actions], each entry N(0, its std^2)."""
        std = self.actor_logstd.detach().exp().cpu().numpy()
        return std * rng.standard_normal((num_envs, *std.shape), dtype=np.float32)

    def get_action_and_value(self, x, lstm_state, starts, action=None, greedy=False, noise=None):
        """Returns action, logprob, entropy, value and the state after the step (see get_states). With gSDE a sampled
        action needs noise, the weights of sample_noise."""
        hidden, lstm_state = self.get_states(x, lstm_state, starts)
        value = self.critic(hidden).squeeze(-1)
        if self.continuous:
            # Gaussian maths written out: torch.distributions objects cost more than the network at this size.
            action_mean, log_std = self.actor(hidden), self.actor_logstd
            if self.gsde:  # noise = latent @ weights: Gaussian, variance latent^2 @ std^2 (latent detached, as SB3)
                latent = hidden.detach()
                log_std = 0.5 * (latent.square() @ (2 * self.actor_logstd).exp() + SDE_EPS).log()
            if action is None and greedy:
                action = action_mean
            elif action is None and self.gsde:
                action = action_mean + (latent.unsqueeze(1) @ noise).squeeze(1)
            elif action is None:
                action = action_mean + log_std.exp() * torch.randn_like(action_mean)
            logprob = (-0.5 * ((action - action_mean) / log_std.exp()).square() - log_std - HALF_LOG_2PI).sum(-1)
            entropy = (0.5 + HALF_LOG_2PI + log_std).sum(-1).expand(len(hidden))
            return action, logprob, entropy, value, lstm_state
        # Categorical maths written out, as in ppo.py.
        logits = self.actor(hidden).view(len(hidden), *self.logits_shape)
        if self.logit_padding is not None:
            logits = logits + self.logit_padding
        allowed = self.allowed(x)
        if allowed is not None:  # as the padding: a masked action's probability is exactly 0 in float32
            logits = logits.masked_fill(~allowed, -1e8)
        logp = logits.log_softmax(-1)
        if action is None:
            # Gumbel-max: argmax(logp + Gumbel noise) samples the categorical, in fewer ops than torch.multinomial
            action = logp if greedy else logp - torch.empty_like(logp).exponential_().log()
            action = action.argmax(-1)
        logprob = logp.gather(-1, action.unsqueeze(-1)).squeeze(-1).sum(-1)
        entropy = -(logp.exp() * logp).sum((-2, -1))
        return action, logprob, entropy, value, lstm_state


def torch_policy(agent: Agent, device: torch.device):
    """The rollout's sampling by the torch network itself: (obs, state, starts, gSDE noise or None) -> (action,
    logprob, value, state after the step), NumPy in and out, as numpy_policy."""

    def policy(obs, state, starts, noise=None):
        with torch.inference_mode():  # no autograd bookkeeping at all: the fastest mode
            action, logprob, _, value, state = agent.get_action_and_value(
                *(torch.from_numpy(x).to(device) for x in (obs, state, starts)),
                noise=None if noise is None else torch.from_numpy(noise).to(device),
            )
        return action.cpu().numpy(), logprob.cpu().numpy(), value.cpu().numpy(), torch.stack(state).cpu().numpy()

    return policy


def rollout_policy(agent: Agent, rng: np.random.Generator, device: torch.device, probe: tuple):
    """The policy the rollout samples from: numpy_policy on the CPU where it reproduces get_action_and_value on the
    probe (observations, LSTM states, starts, gSDE noise), with the agent's weights and with randomly perturbed ones
    (a module the mirror does not see may change nothing until it is trained); else the torch network itself."""
    policy = numpy_policy(agent, rng) if device.type == "cpu" else None
    if policy is not None:
        twin, noise = copy.deepcopy(agent), torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=noise))
        try:
            mismatch = ""
            for network, mirror in ((agent, policy), (twin, numpy_policy(twin, rng))):
                action, logprob, value, _ = mirror(*probe)
                with torch.no_grad():
                    inputs = map(torch.from_numpy, (*probe[:3], action))
                    _, newlogprob, _, newvalue, _ = network.get_action_and_value(*inputs)
                mismatch = mismatch or rollout_mismatch(newlogprob, logprob, newvalue, value)
        except Exception as e:  # an edited network the mirror cannot even run, e.g. other input sizes
            mismatch = f"it fails with {type(e).__name__}"
        if mismatch:
            print(f"note: the NumPy rollout cannot follow this Agent ({mismatch}): the rollout runs the torch network")
            policy = None
    return policy or torch_policy(agent, device)


def sequence_segments(starts: np.ndarray) -> tuple:
    """Cut B envs' time-major sequences at their episode starts (starts [T, B]: True at an episode's first step) into
    segments, laid out as one padded LSTM batch [L: the longest segment, S: the segments]. Returns
    - pad_inds [L, S]: the time-major index t * B + b of each segment's steps (0 in the padding, which is at the end);
    - unpad [T * B]: where step t * B + b lies in that batch, flattened to [L * S];
    - seg_env [S]: the env of each segment;
    - resume [S]: whether the segment goes on from the state before the sequence (it begins at t = 0, and not with an
      episode); every other segment begins an episode, from zeros."""
    num_steps, num_envs = starts.shape
    begins = starts.T.copy()  # env-major [B, T], so that each env's segments are consecutive
    begins[:, 0] = True
    begins = begins.reshape(-1)
    segment = np.cumsum(begins) - 1
    first = np.flatnonzero(begins)
    position = np.arange(len(begins)) - first[segment]
    env, t = np.divmod(np.arange(len(begins)), num_steps)
    pad_inds = np.zeros((position.max() + 1, len(first)), np.int64)
    pad_inds[position, segment] = t * num_envs + env
    unpad = np.empty(len(begins), np.int64)
    unpad[t * num_envs + env] = position * len(first) + segment
    seg_env = first // num_steps
    return pad_inds, unpad, seg_env, (first % num_steps == 0) & ~starts[0, seg_env]


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
    """The rollout's sampling written in NumPy, derived from the agent's encoders, LSTM and heads: at a few envs a
    torch step is dozens of small ops, each paying its dispatch, and this runs faster per env step. (obs, state,
    starts, gSDE noise or None) -> (action, logprob, value, state after the step), the state (h, c) stacked
    [2, layers, envs, hidden];
    None for images (a CNN's maths outweighs the dispatch) or where a module is one this mirror does not know."""
    lstm, image = agent.lstm, any(encoder.image for encoder in agent.encoders)
    if image or type(lstm) is not nn.LSTM or lstm.proj_size or not lstm.bias or lstm.bidirectional:
        return None
    encoders = [numpy_module(encoder.net) for encoder in agent.encoders]
    actor, critic = numpy_module(agent.actor), numpy_module(agent.critic)
    if None in (*encoders, actor, critic):
        return None
    cells = [[w.detach().numpy().T for w in weights] for weights in lstm.all_weights]  # w_ih, w_hh, b_ih, b_hh
    split, size = np.cumsum(agent.obs_sizes)[:-1], lstm.hidden_size
    if agent.continuous:
        logstd = agent.actor_logstd.detach().numpy()
    else:
        padding = None if agent.logit_padding is None else agent.logit_padding.numpy()
        categories = np.arange(agent.logits_shape[1])  # for the sampled action's log-probability

    cols = agent.obs_cols
    if not agent.continuous:
        slots, table_size = agent.mask_slots.cpu().numpy(), int(np.prod(agent.logits_shape))

    def policy(obs, state, starts, noise=None):
        flat_mask = None
        if obs.shape[1] > cols:  # an action mask follows the observation (Agent.allowed)
            obs, flat_mask = obs[:, :cols], obs[:, cols:]
        parts = [encoder(x) for x, encoder in zip(np.split(obs, split, axis=1), encoders)]
        x = np.concatenate(parts, 1) if len(parts) > 1 else parts[0]
        state = state * ~starts[:, None] if starts.any() else state  # an episode begins: its env's state restarts
        new_state = np.empty_like(state)
        for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(cells):
            h, c = state[:, layer]
            gates = x @ w_ih + h @ w_hh + (b_ih + b_hh)  # input, forget, cell and output gates, torch's order
            sigmoid = 1 / (1 + np.exp(-gates))
            c = sigmoid[:, size : 2 * size] * c + sigmoid[:, :size] * np.tanh(gates[:, 2 * size : 3 * size])
            x = sigmoid[:, 3 * size :] * np.tanh(c)
            new_state[0, layer], new_state[1, layer] = x, c
        value = critic(x)[:, 0]
        if agent.continuous:
            if agent.gsde:
                std = np.sqrt(np.square(x) @ np.exp(2 * logstd) + SDE_EPS)
                deviation = np.einsum("bh,bha->ba", x, noise)
            else:
                std = np.exp(logstd)
                deviation = std * rng.standard_normal((len(x), logstd.shape[-1]), dtype=np.float32)
            logprob = (-0.5 * np.square(deviation / std) - np.log(std) - HALF_LOG_2PI).sum(-1)
            return actor(x) + deviation, logprob, value, new_state
        logits = actor(x).reshape(len(x), *agent.logits_shape)
        if padding is not None:
            logits = logits + padding
        if flat_mask is not None:
            allowed = np.zeros((len(x), table_size), dtype=bool)
            allowed[:, slots] = flat_mask > 0.5
            logits = np.where(allowed.reshape(logits.shape), logits, np.float32(-1e8))
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        action = (logp - np.log(rng.standard_exponential(logp.shape, dtype=np.float32))).argmax(-1)
        logprob = (logp * (categories == action[..., None])).sum((-2, -1))
        return action, logprob, value, new_state

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


class ObsPreparer:
    """Env observations -> what the agent sees and the rollout stores: velocities zeroed (--mask-velocity), encoded as
    one float32 vector per env (encode_obs; the Agent splits a Dict's or Tuple's entries again), normalised
    (--norm-obs); images stay uint8 as they are. Where the env gives an action mask (info["action_mask"] or a Dict
    observation's, see observed_space; flat over the components), it is appended to vector observations: stored and
    replayed with them, it gives the update the rollout's distribution."""

    def __init__(self, space: gym.Space, args: Args, action_space: gym.Space):
        self.mask_in_obs, self.space = observed_space(space) is not space, observed_space(space)
        discrete = not isinstance(action_space, gym.spaces.Box)
        self.use_mask, self.mask_size = args.action_mask and discrete, int(discrete and action_nvec(action_space).sum())
        self.masked = None  # whether the env gives masks: its first observations (a reset) tell
        self.image, self.velocity_mask = is_image(self.space), velocity_mask(args, self.space)
        if args.norm_obs and any(is_image(entry) for entry in obs_entries(self.space)):
            raise UserError(f"--norm-obs normalises vector observations, not images ({self.space})")
        self.obs_norm = ObsNormalizer((encoded_size(self.space),)) if args.norm_obs else None

    def __call__(self, obs, info: dict, update: bool = True) -> np.ndarray:
        """update=False freezes the normalisation statistics (evaluation)."""
        if self.mask_in_obs:
            obs, info = obs["observation"], {"action_mask": obs["action_mask"]}
        if self.image:
            obs = np.asarray(obs, dtype=np.uint8)
        else:
            obs = encode_obs(self.space, obs * self.velocity_mask if self.velocity_mask is not None else obs)
            obs = self.obs_norm(obs, update) if self.obs_norm else obs
        if self.masked is None:
            self.masked = self.use_mask and "action_mask" in info
            if self.masked and self.image:
                raise UserError("action masks are taken with vector observations, not images: pass --no-action-mask")
        if not self.masked:
            return obs
        mask = np.array(info["action_mask"], dtype=np.float32).reshape(len(obs), -1)
        if mask.shape[1] != self.mask_size:
            raise UserError(f"the env's action mask has {mask.shape[1]} entries for {self.mask_size} actions")
        mask[~info.get("_action_mask", np.ones(len(obs), dtype=bool))] = 1  # no mask at this step: all allowed
        return np.concatenate([obs, mask], axis=1)


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


def evaluate(agent: Agent, prepare: ObsPreparer, envs, num_episodes: int, seed: int, atari: bool = False) -> list:
    """Real episodic returns of num_episodes played with the greedy policy (the most likely action, or the Gaussian's
    mean), the LSTM state carried from step to step and restarted at each episode's first observation (for Atari,
    at each life's), and for Atari the real scores of whole games."""
    next_obs = prepare(*envs.reset(seed=seed), update=False)
    lstm_state, start = agent.initial_state(envs.num_envs), np.zeros(envs.num_envs, dtype=bool)
    tracker, games, returns = EpisodeTracker(envs.num_envs), EpisodeTracker(envs.num_envs), []
    device = next(agent.parameters()).device
    while len(returns) < num_episodes:
        with torch.no_grad():
            action, *_, lstm_state = agent.get_action_and_value(
                torch.from_numpy(next_obs).to(device), lstm_state, torch.from_numpy(start).to(device), greedy=True
            )
        start = tracker.reset  # after a reset step comes an episode's first step
        action = to_env_action(action.cpu().numpy(), envs.single_action_space)
        next_obs, reward, terminated, truncated, info = envs.step(action)
        next_obs = prepare(next_obs, info, update=False)
        ended = tracker.step(reward, terminated, truncated)
        if atari:
            ended = games.step(info["reward"], info["terminated"].astype(bool), truncated)
        returns += [episode_return for episode_return, _ in ended]
    return returns[:num_episodes]


def run_evaluation(
    agent: Agent, prepare: ObsPreparer, args: Args, backend: str, seed: int, video_folder: str | None
) -> list:
    """Evaluate on a fresh env (rendered by gymnasium when recording videos) and print mean ± std."""
    envs = make_envs(args.env_id, 1, seed, "gymnasium" if video_folder else backend, video_folder)
    returns = evaluate(agent, prepare, envs, args.eval_episodes, seed, is_atari(args.env_id, backend))
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


def main(args: Args) -> None:
    script = os.path.basename(__file__)
    validate_args(args)
    checkpoint = None
    if args.eval_checkpoint or args.resume:
        flag = "--eval-checkpoint" if args.eval_checkpoint else "--resume"
        checkpoint = load_checkpoint(args.eval_checkpoint or args.resume, flag, script)
        # The env, its observations and the network are the checkpoint's.
        keys = ("env_id", "mask_velocity", "norm_obs", "norm_reward", "lstm_hidden_size", "lstm_num_layers", "gsde")
        follow_checkpoint(args, checkpoint, keys)
    backend = choose_backend(args.env_id, args.num_envs, args.env_backend)
    if args.capture_video and args.eval_episodes and not gymnasium_has(args.env_id):
        raise UserError(f"--capture-video: videos are rendered by gymnasium, which has no env {args.env_id}")
    if args.capture_video and sys.platform == "linux" and not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # MuJoCo renders through a window (GLFW) by default: none here
    # One torch thread: at a small MLP's and LSTM's sizes a second thread's synchronisation costs more than it brings
    # (and slows a run badly when another process holds a core). A CNN is the exception (below).
    device = choose_device(args.cuda)
    cores = torch.get_num_threads()
    torch.set_num_threads(1)

    network = (args.lstm_hidden_size, args.lstm_num_layers, args.gsde, args.log_std_init)  # Agent's arguments
    if args.eval_checkpoint:
        envs = make_envs(args.env_id, 1, args.seed, backend)
        agent = Agent(envs.single_observation_space, envs.single_action_space, *network).to(device)
        prepare = ObsPreparer(envs.single_observation_space, args, envs.single_action_space)
        envs.close()
        load_agent(agent, checkpoint, "--eval-checkpoint")
        if prepare.obs_norm:
            prepare.obs_norm.load_state_dict(checkpoint["obs_rms"])
        video_folder = os.path.join(os.path.dirname(args.eval_checkpoint), "videos") if args.capture_video else None
        run_evaluation(agent, prepare, args, backend, args.seed, video_folder)
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

    envs = make_envs(args.env_id, args.num_envs, seed, backend)
    if args.gsde and not isinstance(envs.single_action_space, gym.spaces.Box):
        raise UserError(f"--gsde explores Box actions; {args.env_id} has {envs.single_action_space}")
    agent = Agent(envs.single_observation_space, envs.single_action_space, *network).to(device)
    prepare = ObsPreparer(envs.single_observation_space, args, envs.single_action_space)
    return_scaler = ReturnScaler(args.num_envs, args.gamma) if args.norm_reward else None
    if any(encoder.image for encoder in agent.encoders):
        torch.set_num_threads(cores)  # convolutions use every core well (README, ppo_lstm.py's speed)
    # Fused Adam: one kernel for every parameter instead of a loop of small ones (README, Speed).
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    if checkpoint:
        load_agent(agent, checkpoint, "--resume")
        optimizer.load_state_dict(checkpoint["optimizer"])
        if prepare.obs_norm:
            prepare.obs_norm.load_state_dict(checkpoint["obs_rms"])
        if return_scaler:
            return_scaler.load_state_dict(checkpoint["return_rms"])
    run_dir = open_run(args, asdict(args))
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    )

    # Rollout storage, [num_steps, num_envs, ...]: observations as ObsPreparer gives them, actions as [.., components]
    # category indices or Gaussian samples. starts marks each episode's first observation, where the LSTM restarts.
    next_obs = prepare(*envs.reset(seed=seed))
    obs = np.zeros((args.num_steps, *next_obs.shape), dtype=next_obs.dtype)
    action_dtype = np.float32 if agent.continuous else np.int64
    actions = np.zeros((args.num_steps, args.num_envs, agent.action_dim), dtype=action_dtype)
    logprobs = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    values = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    truncations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    resets = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    starts = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    # The LSTM state (h, c) before each step, [num_steps, 2, layers, num_envs, hidden]: the training pass replays
    # sequences of --seq-len steps, each from the state stored at its first step. Sequence i covers steps
    # seq_t0[i] .. seq_t0[i] + seq_len - 1 of env seq_env[i].
    lstm_state = torch.stack(agent.initial_state(args.num_envs)).cpu().numpy()
    probe_space = gym.vector.utils.batch_space(envs.single_observation_space, 64)
    probe_space.seed(seed)
    rng = np.random.default_rng(seed)
    probe_state = rng.standard_normal((2, agent.lstm.num_layers, 64, agent.lstm.hidden_size), dtype=np.float32)
    probe_noise = agent.sample_noise(64, rng) if agent.gsde else None
    probe_info = {"action_mask": rng.random((64, prepare.mask_size)) < 0.7}  # used where the env gives masks
    probe_obs = prepare(probe_space.sample(), probe_info, update=False)
    probe = (probe_obs, probe_state, rng.random(64) < 0.25, probe_noise)
    policy = rollout_policy(agent, rng, device, probe)
    lstm_states = np.zeros((args.num_steps, *lstm_state.shape), dtype=np.float32)
    seq_len = args.seq_len or args.num_steps
    num_sequences = args.num_envs * (args.num_steps // seq_len)
    seq_t0 = torch.arange(num_sequences, device=device).div(args.num_envs, rounding_mode="floor") * seq_len
    seq_env = torch.arange(num_sequences, device=device) % args.num_envs

    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    tracker, recent_returns = EpisodeTracker(args.num_envs), deque(maxlen=100)
    # Atari: training episodes (tracker) end at every lost life; the statistics are those of whole games (games).
    games = EpisodeTracker(args.num_envs) if is_atari(args.env_id, backend) else None
    progress = Progress(args.total_timesteps, global_step)
    start_time, start_step = time.time(), global_step

    for iteration in range(start_iteration, num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / num_iterations
            for group in optimizer.param_groups:  # each group from its own initial lr, as torch's schedulers
                group["lr"] = frac * group.setdefault("initial_lr", group["lr"])

        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            # The state restarts at each episode's first observation, one step after the reset step: the reset step's
            # observation is the old episode's final one, whose value (with the old state) bootstraps a truncation.
            # At step 0, resets[step - 1] is still the previous rollout's last flag.
            starts[step], resets[step] = resets[step - 1], tracker.reset
            lstm_states[step] = lstm_state
            if agent.gsde and step % (args.sde_sample_freq or args.num_steps) == 0:
                noise = agent.sample_noise(args.num_envs, rng)  # at each rollout's start and every sde_sample_freq
            actions[step], logprobs[step], values[step], lstm_state = policy(
                obs[step], lstm_state, starts[step], noise if agent.gsde else None
            )

            next_obs, reward, terminations[step], truncations[step], info = envs.step(
                to_env_action(actions[step], envs.single_action_space)
            )
            next_obs = prepare(next_obs, info)
            rewards[step] = return_scaler(reward, resets[step]) if return_scaler else reward
            ended = tracker.step(reward, terminations[step], truncations[step])
            if games:
                ended = games.step(info["reward"], info["terminated"].astype(bool), truncations[step])
            for episode_return, episode_length in ended:
                recent_returns.append(episode_return)
                writer.add_scalar("charts/episodic_return", episode_return, global_step)
                writer.add_scalar("charts/episodic_length", episode_length, global_step)

        with torch.no_grad():
            next_value = (
                agent.get_value(*(torch.from_numpy(x).to(device) for x in (next_obs, lstm_state, resets[-1])))
                .cpu()
                .numpy()
            )
        check_finite(iteration, observations=obs, rewards=rewards)
        advantages, returns = compute_gae(
            rewards, values, terminations, truncations, resets, next_value, args.gamma, args.gae_lambda
        )

        # The batch keeps every step in time-major order [num_steps * num_envs], so that sequences replay; the
        # reset steps of next-step autoreset are replayed (the state runs through them) but never trained on.
        b_obs = torch.from_numpy(obs.reshape(batch_size, *obs.shape[2:])).to(device)
        b_actions = torch.from_numpy(actions.reshape(batch_size, -1)).to(device)
        b_logprobs, b_advantages, b_returns, b_values, b_starts, b_transition = (
            torch.from_numpy(x.reshape(-1)).to(device) for x in (logprobs, advantages, returns, values, starts, ~resets)
        )
        b_lstm_states = torch.from_numpy(lstm_states).to(device)

        stats, num_updates = {}, 0  # each loss statistic, by name, summed over the minibatches
        for epoch in range(args.update_epochs):
            for mb_seqs in torch.randperm(num_sequences, device=device).tensor_split(args.num_minibatches):
                t0, env = seq_t0[mb_seqs], seq_env[mb_seqs]
                mb_inds = ((t0 + torch.arange(seq_len, device=device)[:, None]) * args.num_envs + env).reshape(-1)
                mb_state = b_lstm_states[t0, :, :, env].movedim(0, 2)  # [2, layers, sequences, hidden]
                _, newlogprob, entropy, newvalue, _ = agent.get_action_and_value(
                    b_obs[mb_inds], mb_state, b_starts[mb_inds], b_actions[mb_inds]
                )
                keep = b_transition[mb_inds]
                newlogprob, entropy, newvalue, mb_inds = newlogprob[keep], entropy[keep], newvalue[keep], mb_inds[keep]
                if num_updates == 0:  # nothing has moved the network since the rollout: it must give the same numbers
                    check_rollout(newlogprob, b_logprobs[mb_inds], newvalue, b_values[mb_inds], iteration)
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
        y_pred, y_true = b_values[b_transition].cpu().numpy(), b_returns[b_transition].cpu().numpy()
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
                    **({"obs_rms": prepare.obs_norm.state_dict()} if prepare.obs_norm else {}),
                    **({"return_rms": return_scaler.state_dict()} if return_scaler else {}),
                },
            )
        ret = f"{np.mean(recent_returns):.1f} (last {len(recent_returns)} episodes)" if recent_returns else "n/a"
        progress.update(global_step, f"{sps:,.0f} SPS | return {ret}")

    envs.close()
    progress.close()
    mean_return = f"{np.mean(recent_returns):.2f}" if recent_returns else "n/a"
    print(
        f"done: {global_step:,} steps in {time.time() - start_time:.1f} s ({sps:,.0f} SPS); "
        f"mean return of the last {len(recent_returns)} episodes {mean_return}; checkpoint {checkpoint_path}"
    )

    if args.eval_episodes:
        video_folder = os.path.join(run_dir, "videos") if args.capture_video else None
        eval_returns = run_evaluation(agent, prepare, args, backend, seed, video_folder)
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
