"""PPO for continuous actions (Box), e.g. MuJoCo: ppo.py with a Gaussian policy and running normalisation.

A copy of ppo.py, the reference script of this project, changed for continuous actions: the policy is a diagonal
Gaussian with a state-independent log-std, the sampled action is stored and trained on while the env gets it clipped
to its bounds, observations are normalised by their running mean and std, and rewards are scaled by the running std of
the discounted return (both statistics travel in the checkpoint). Options for Box actions: gSDE exploration (--gsde),
advantages recomputed before every epoch (--recompute-adv), the networks' width and nonlinearity (--hidden-size,
--activation). The defaults are the MuJoCo settings of the PPO paper and of CleanRL's ppo_continuous_action.py.

Paper: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347
Details: Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization", ICLR blog track.

    python ppo_continuous.py                                       # HalfCheetah-v4, 1M steps
    # Tianshou's MuJoCo recipe (benchmark.sh's `tuned`): Hopper-v4 at 1M, a greedy return of ~3,350 (5 seeds)
    python ppo_continuous.py --env-id Hopper-v4 --num-envs 8 --num-steps 256 --ent-coef 0 --vf-coef 0.25 \
        --no-clip-vloss --no-norm-adv --recompute-adv --log-std-init -0.5
    # the same on Humanoid-v4, its initial std scaled to its bounds of +-0.4: training return ~850 (5 seeds: 684-1,308)
    python ppo_continuous.py --env-id Humanoid-v4 --num-envs 8 --num-steps 256 --ent-coef 0 --vf-coef 0.25 \
        --no-clip-vloss --no-norm-adv --recompute-adv --log-std-init -1.4
    # the tuned recipe in ReLU units on HalfCheetah-v4 (`tuned ReLU`): training return ~5,600, greedy ~5,900 (5 seeds)
    python ppo_continuous.py --num-envs 8 --num-steps 256 --ent-coef 0 --vf-coef 0.25 --no-clip-vloss \
        --no-norm-adv --recompute-adv --log-std-init -0.5 --activation relu
    python ppo_continuous.py --env-id Pendulum-v1 --seed 2 --track # log to wandb as well
    python ppo_continuous.py --eval-checkpoint runs/RUN/checkpoint.pt --capture-video
    python ppo_continuous.py --eval-checkpoint runs/RUN/checkpoint.pt --save-dataset expert.npz
    python ppo_continuous.py --bc-dataset expert.npz               # clone the expert's steps, then PPO
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
    """greedy-policy (mean action) episodes played after training and by --eval-checkpoint (0: no evaluation)"""
    eval_checkpoint: str | None = None
    """evaluate the checkpoint at this path with the greedy policy (mean action), then exit without training"""
    resume: str | None = None
    """continue the run of the checkpoint at this path (weights, optimizer, global step, lr schedule)"""
    save_dataset: str | None = None
    """with --eval-checkpoint: also write the evaluation's observations and actions to this .npz, for --bc-dataset"""
    bc_dataset: str | None = None
    """pretrain the actor on this .npz of expert steps (--save-dataset) by behaviour cloning before the first rollout"""
    bc_epochs: int = 10
    """the number of behaviour-cloning epochs over --bc-dataset, in minibatches of PPO's size"""
    bc_learning_rate: float = 1e-3
    """the learning rate of behaviour cloning (its own Adam)"""

    # Algorithm specific arguments
    env_id: str = "HalfCheetah-v4"
    """the id of the environment: an envpool id, a gymnasium id, or `module:EnvId-v0` for your own"""
    mask_velocity: bool = False
    """if toggled, zero the velocities observed in CartPole, Pendulum, Acrobot, MountainCar(Continuous), LunarLander"""
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"
    """who steps the envs; auto takes the faster: gymnasium below 8 envs, envpool from 8 (measured)"""
    total_timesteps: int = 1000000
    """total environment steps of the experiment, all envs together"""
    learning_rate: float = 3e-4
    """the learning rate of the optimizer"""
    num_envs: int = 1
    """the number of parallel environments"""
    num_steps: int = 2048
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """if toggled, the learning rate decays linearly to 0 over the run"""
    gamma: float = 0.99
    """the discount factor gamma (also of the return whose running std scales the rewards)"""
    gae_lambda: float = 0.95
    """the lambda of the general advantage estimation"""
    num_minibatches: int = 32
    """the number of minibatches per update epoch"""
    update_epochs: int = 10
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
    gsde: bool = False
    """if toggled, explore by gSDE (Raffin et al. 2021): noise linear in the actor's hidden features, smooth in time"""
    sde_sample_freq: int = 0
    """with --gsde, draw new noise weights every this many steps (0: only at the start of each rollout)"""
    log_std_init: float = 0.0
    """the initial log-std of the Gaussian policy (with --gsde: of each noise weight)"""
    hidden_size: int = 64
    """the width of the two hidden layers of the actor and of the critic (64: CleanRL's, the PPO paper's)"""
    activation: Literal["tanh", "relu"] = "tanh"
    """the hidden layers' nonlinearity (tanh: CleanRL's, the PPO paper's; relu: RL Zoo's tuned MuJoCo entries)"""
    recompute_adv: bool = False
    """if toggled, the advantages and returns are recomputed with the critic as trained so far before every epoch
    after the first (Tianshou's MuJoCo recipe)"""


class UserError(Exception):
    """A mistake in the input: printed as one line, exit status 2 (as for a bad flag), no traceback."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())  # one line, whatever it quotes (a 2-D space's repr spans two)


# Envpool warns that reset(seed=) is ignored (its envs are seeded in envpool.make, as make_envs does) and that its
# spaces' float64 bounds become float32: neither applies to a user's run.
warnings.filterwarnings("ignore", message=".*(EnvPool seeds are fixed|precision lowered by casting).*")

# Envpool is faster than gymnasium's SyncVectorEnv from this many HalfCheetahs on (2-core machine, see README).
ENVPOOL_MIN_ENVS = 8

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
    for flag in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "hidden_size"):
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
    if args.save_dataset and not args.eval_checkpoint:
        raise UserError("--save-dataset records the evaluation episodes of --eval-checkpoint: pass one")
    if args.bc_dataset and (args.eval_checkpoint or args.resume):
        raise UserError("--bc-dataset pretrains a new run: it excludes --eval-checkpoint and --resume")
    if args.bc_epochs <= 0:
        raise UserError(f"--bc-epochs {args.bc_epochs} must be positive")
    if not 0 < args.bc_learning_rate < np.inf:  # NaN fails too
        raise UserError(f"--bc-learning-rate {args.bc_learning_rate} must be a positive number")
    if args.save_dataset and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_dataset))):
        raise UserError(f"--save-dataset {args.save_dataset}: its folder does not exist")
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


def to_env_action(action: np.ndarray, space: gym.spaces.Box) -> np.ndarray:
    """[num_envs, action dims] Gaussian samples -> the env's action layout, clipped to its bounds. Only the env sees
    the clipped action: the rollout stores and trains on the sample, whose log-probability the Gaussian gives."""
    return np.clip(action.reshape(len(action), *space.shape), space.low, space.high)


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


class Agent(nn.Module):
    def __init__(
        self,
        obs_space: gym.Space,
        act_space: gym.Space,
        gsde: bool = False,
        log_std_init: float = 0.0,
        hidden: int = 64,
        activation: Literal["tanh", "relu"] = "tanh",
    ):
        super().__init__()
        if not isinstance(act_space, gym.spaces.Box):
            discrete = (gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
            hint = " (use ppo.py for these)" if isinstance(act_space, discrete) else ""
            raise UserError(f"ppo_continuous.py handles Box actions, not {act_space}{hint}")
        # observations arrive encoded as flat float vectors (ObsPreparer)
        obs_dim, act_dim = encoded_size(obs_space), int(np.prod(act_space.shape))
        act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            act(),
            layer_init(nn.Linear(hidden, hidden)),
            act(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        # The actor gives the Gaussian's mean; its log-std is one learned number per action dimension, independent of
        # the state (PPO paper, CleanRL), starting at 0: std 1. gSDE learns one per (latent, action) pair instead, the
        # latent being the input of the actor's last layer: the noise is the latent times weights of these stds
        # (sample_noise), so its std depends on the state.
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            act(),
            layer_init(nn.Linear(hidden, hidden)),
            act(),
            layer_init(nn.Linear(hidden, act_dim), std=0.01),
        )
        self.gsde, rows = gsde, self.actor[-1].in_features if gsde else 1
        self.actor_logstd = nn.Parameter(torch.full((rows, act_dim), float(log_std_init)))

    def features(self, x):
        return x

    def get_value(self, x):
        return self.critic(self.features(x)).squeeze(-1)

    def sample_noise(self, num_envs: int, rng: np.random.Generator) -> np.ndarray:
        """gSDE's noise weights, one matrix per env [envs, latent size, actions], each entry N(0, its std^2)."""
        std = self.actor_logstd.detach().exp().cpu().numpy()
        return std * rng.standard_normal((num_envs, *std.shape), dtype=np.float32)

    def get_action_and_value(self, x, action=None, greedy=False, noise=None):
        """With gSDE a sampled action needs noise, the weights of sample_noise."""
        # Gaussian maths written out: torch.distributions objects cost more than the network at this size.
        x = self.features(x)
        if self.gsde:  # noise = latent @ weights: Gaussian, variance latent^2 @ std^2 (latent detached, as SB3)
            latent = self.actor[:-1](x)
            action_mean, latent = self.actor[-1](latent), latent.detach()
            log_std = 0.5 * (latent.square() @ (2 * self.actor_logstd).exp() + SDE_EPS).log()
        else:
            action_mean, log_std = self.actor(x), self.actor_logstd
        if action is None and greedy:
            action = action_mean
        elif action is None and self.gsde:
            action = action_mean + (latent.unsqueeze(1) @ noise).squeeze(1)
        elif action is None:
            action = action_mean + log_std.exp() * torch.randn_like(action_mean)
        logprob = (-0.5 * ((action - action_mean) / log_std.exp()).square() - log_std - HALF_LOG_2PI).sum(-1)
        entropy = (0.5 + HALF_LOG_2PI + log_std).sum(-1).expand(len(x))
        return action, logprob, entropy, self.critic(x).squeeze(-1)


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
    trunk, head = (agent.actor[:-1], agent.actor[-1]) if agent.gsde else (agent.actor, nn.Identity())
    trunk, head, critic = numpy_module(trunk), numpy_module(head), numpy_module(agent.critic)
    if trunk is None or head is None or critic is None:
        return None
    logstd = agent.actor_logstd.detach().numpy()

    def policy(obs, noise=None):
        latent = trunk(obs)
        if agent.gsde:
            std = np.sqrt(np.square(latent) @ np.exp(2 * logstd) + SDE_EPS)
            deviation = np.einsum("bh,bha->ba", latent, noise)
            # the Gaussian log-density at the sample, over all dimensions
            logprob = (-0.5 * np.square(deviation / std) - np.log(std) - HALF_LOG_2PI).sum(-1)
        else:  # the same, where (sample - mean) / std is the noise drawn
            noise = rng.standard_normal((len(obs), logstd.shape[-1]), dtype=np.float32)
            deviation = np.exp(logstd) * noise
            logprob = (-0.5 * np.square(noise) - logstd - HALF_LOG_2PI).sum(-1)
        return head(latent) + deviation, logprob, critic(obs)[:, 0]

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


def torch_policy(agent: Agent, device: torch.device):
    """The rollout's sampling by the torch network itself: obs -> (action, logprob, value), NumPy in and out."""

    def policy(obs, noise=None):
        with torch.inference_mode():  # no autograd bookkeeping at all: the fastest mode
            noise = None if noise is None else torch.from_numpy(noise).to(device)
            action, logprob, _, value = agent.get_action_and_value(torch.from_numpy(obs).to(device), noise=noise)
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
            mismatch, noise = "", agent.sample_noise(len(probe), rng) if agent.gsde else None
            for network, mirror in ((agent, policy), (twin, numpy_policy(twin, rng))):
                action, logprob, value = mirror(probe, noise)
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
    one float32 vector per env (encode_obs), then normalised by the running mean and std of every observation seen
    (ObsNormalizer)."""

    def __init__(self, space: gym.Space, args: Args):
        self.space, self.size, self.velocity_mask = space, encoded_size(space), velocity_mask(args, space)
        self.obs_norm = ObsNormalizer((self.size,))

    def __call__(self, obs, update: bool = True) -> np.ndarray:
        """update=False freezes any statistics the preparation keeps (evaluation)."""
        if self.velocity_mask is not None:
            obs = obs * self.velocity_mask
        obs = self.obs_norm(encode_obs(self.space, obs), update)
        return obs.astype(np.float32, copy=False)


def evaluate(agent: Agent, prepare: ObsPreparer, envs, num_episodes: int, seed: int, steps: list | None = None) -> list:
    """Real episodic returns of num_episodes played with the greedy policy (the mean action), the observations
    prepared as in training, with any statistics frozen. steps, where given, receives each step's (observations,
    actions) as the agent saw and chose them, the reset steps of next-step autoreset left out."""
    next_obs = prepare(envs.reset(seed=seed)[0], update=False)
    tracker, returns, device = EpisodeTracker(envs.num_envs), [], next(agent.parameters()).device
    while len(returns) < num_episodes:
        with torch.no_grad():
            action = agent.get_action_and_value(torch.from_numpy(next_obs).to(device), greedy=True)[0].cpu().numpy()
        if steps is not None:
            steps.append((next_obs[~tracker.reset], action[~tracker.reset]))
        next_obs, reward, terminated, truncated, _ = envs.step(to_env_action(action, envs.single_action_space))
        next_obs = prepare(next_obs, update=False)
        returns += [episode_return for episode_return, _ in tracker.step(reward, terminated, truncated)]
    return returns[:num_episodes]


def run_evaluation(
    agent: Agent, prepare: ObsPreparer, args: Args, backend: str, seed: int, video_folder: str | None, steps=None
) -> list:
    """Evaluate on a fresh env (rendered by gymnasium when recording videos) and print mean ± std."""
    envs = make_envs(args.env_id, 1, seed, "gymnasium" if video_folder else backend, video_folder)
    returns = evaluate(agent, prepare, envs, args.eval_episodes, seed, steps)
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


def save_dataset(path: str, script: str, args: Args, steps: list, returns: list, **statistics) -> None:
    """Write an evaluation's steps (evaluate) as an expert dataset, atomically: arrays only, read back as data."""
    observations, actions = (np.concatenate(arrays) for arrays in zip(*steps))
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, script=script, env_id=args.env_id, mask_velocity=args.mask_velocity, observations=observations,
                 actions=actions, returns=np.array(returns), **statistics)  # fmt: skip
    os.replace(tmp, path)
    print(f"dataset: {len(observations):,} steps of {len(returns)} episodes written to {path}")


def load_dataset(path: str, script: str, args: Args) -> dict:
    """Read a dataset of --save-dataset (no pickles: nothing in it runs); raises UserError where it does not fit."""
    flag = f"--bc-dataset {path}"
    if not os.path.isfile(path):
        raise UserError(f"{flag}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            dataset = {key: data[key] for key in data.files}
    except Exception as e:
        raise UserError(
            f"{flag} is not a readable .npz file ({type(e).__name__}); write one with --save-dataset"
        ) from None
    if not {"script", "env_id", "mask_velocity", "observations", "actions"} <= dataset.keys():
        raise UserError(f"{flag} is not a dataset of this project; write one with {script} --save-dataset")
    for key, value in (("script", script), ("env_id", args.env_id), ("mask_velocity", args.mask_velocity)):
        if dataset[key] != value:
            raise UserError(f"{flag} was recorded with {key} {dataset[key]}, not {value}: record it as you train")
    if len(dataset["observations"]) != len(dataset["actions"]) or not len(dataset["actions"]):
        raise UserError(f"{flag}: its observations and actions must be equally many, one or more")
    return dataset


def behaviour_cloning(agent: Agent, dataset: dict, prepare: ObsPreparer, args: Args, writer) -> None:
    """PPO1's pretraining: the actor learns the dataset's actions by maximum likelihood, --bc-epochs epochs of
    minibatches of PPO's size with its own Adam, before the first rollout. The observations are normalised by the
    expert's statistics, which this run adopts; the log-std stays (a greedy expert's actions have no spread to learn
    it from: it would collapse) and the critic's loss is not in it."""
    observations, actions, size = dataset["observations"], dataset["actions"], (prepare.size,)
    fits = observations.shape[1:] == size and actions.shape[1:] == (agent.actor_logstd.shape[-1],)
    if not fits or not {"obs_mean", "obs_var", "obs_count"} <= dataset.keys() or dataset["obs_mean"].shape != size:
        raise UserError(f"--bc-dataset {args.bc_dataset}: its observations or actions do not fit {args.env_id}'s")
    norm = prepare.obs_norm
    norm.mean, norm.var, norm.count = dataset["obs_mean"], dataset["obs_var"], float(dataset["obs_count"])
    device = next(agent.parameters()).device
    observations, actions = torch.from_numpy(observations).to(device), torch.from_numpy(actions).float().to(device)
    params = [param for name, param in agent.named_parameters() if name != "actor_logstd"]
    optimizer = torch.optim.Adam(params, lr=args.bc_learning_rate, eps=1e-5)
    minibatch_size = args.num_envs * args.num_steps // args.num_minibatches
    for epoch in range(1, args.bc_epochs + 1):
        losses = []
        for indices in torch.randperm(len(actions), device=device).split(minibatch_size):
            loss = -agent.get_action_and_value(observations[indices], actions[indices])[1].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        writer.add_scalar("bc/loss", np.mean(losses), epoch)
    print(f"behaviour cloning: {len(actions):,} expert steps, {args.bc_epochs} epochs, loss {np.mean(losses):.3f}")


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
        follow_checkpoint(args, checkpoint, ("env_id", "mask_velocity", "gsde", "hidden_size", "activation"))
    dataset = load_dataset(args.bc_dataset, script, args) if args.bc_dataset else None
    backend = choose_backend(args.env_id, args.num_envs, args.env_backend)
    if args.capture_video and args.eval_episodes and not gymnasium_has(args.env_id):
        raise UserError(f"--capture-video: videos are rendered by gymnasium, which has no env {args.env_id}")
    if args.capture_video and sys.platform == "linux" and not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # MuJoCo renders through a window (GLFW) by default: none here
    device = choose_device(args.cuda)
    # One CPU thread: at a 64x64 MLP's sizes a second thread's synchronisation costs more than it brings.
    torch.set_num_threads(1)

    network = (args.gsde, args.log_std_init, args.hidden_size, args.activation)  # Agent's arguments
    if args.eval_checkpoint:
        envs = make_envs(args.env_id, 1, args.seed, backend)
        agent = Agent(envs.single_observation_space, envs.single_action_space, *network).to(device)
        prepare = ObsPreparer(envs.single_observation_space, args)
        envs.close()
        load_agent(agent, checkpoint, "--eval-checkpoint")
        prepare.obs_norm.load_state_dict(checkpoint["obs_rms"])
        video_folder = os.path.join(os.path.dirname(args.eval_checkpoint), "videos") if args.capture_video else None
        steps = [] if args.save_dataset else None
        returns = run_evaluation(agent, prepare, args, backend, args.seed, video_folder, steps)
        if args.save_dataset:  # with the statistics that normalised its observations, for the run that clones it
            norm = prepare.obs_norm
            save_dataset(args.save_dataset, script, args, steps, returns, obs_mean=norm.mean, obs_var=norm.var,
                         obs_count=norm.count)  # fmt: skip
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
    agent = Agent(envs.single_observation_space, envs.single_action_space, *network).to(device)
    prepare = ObsPreparer(envs.single_observation_space, args)
    # Fused Adam: one kernel for every parameter instead of a loop of small ones (README, Speed).
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    return_scaler = ReturnScaler(args.num_envs, args.gamma)
    if checkpoint:
        load_agent(agent, checkpoint, "--resume")
        optimizer.load_state_dict(checkpoint["optimizer"])
        prepare.obs_norm.load_state_dict(checkpoint["obs_rms"])
        return_scaler.load_state_dict(checkpoint["return_rms"])
    run_dir = open_run(args, asdict(args))
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    )
    if dataset is not None:
        behaviour_cloning(agent, dataset, prepare, args, writer)
        if args.eval_episodes:  # the pretrained policy's greedy return, before any PPO update
            writer.add_scalar("bc/greedy_return", np.mean(run_evaluation(agent, prepare, args, backend, seed, None)))

    # Rollout storage, [num_steps, num_envs, ...]: normalised observations (what the networks saw), scaled rewards,
    # actions as the Gaussian's unclipped samples, flat
    obs_shape = (prepare.size,)
    obs = np.zeros((args.num_steps, args.num_envs, *obs_shape), dtype=np.float32)
    actions = np.zeros((args.num_steps, args.num_envs, agent.actor_logstd.shape[-1]), dtype=np.float32)
    logprobs = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    values = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    truncations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    resets = np.zeros((args.num_steps, args.num_envs), dtype=bool)

    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    tracker, recent_returns = EpisodeTracker(args.num_envs), deque(maxlen=100)
    progress = Progress(args.total_timesteps, global_step)
    # The agent sees, and the rollout stores, each observation prepared once, as the envs return it: the same numbers
    # serve the policy, the stored batch and next_value.
    next_obs = prepare(envs.reset(seed=seed)[0])
    samples = gym.vector.utils.batch_space(prepare.space, 64)
    samples.seed(seed)
    probe = prepare(samples.sample(), update=False)  # observations the mirror is checked on, prepared as the env's
    rng = np.random.default_rng(seed)
    policy = rollout_policy(agent, rng, device, probe)
    start_time, start_step = time.time(), global_step

    for iteration in range(start_iteration, num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / num_iterations
            for group in optimizer.param_groups:  # each group from its own initial lr, as torch's schedulers
                group["lr"] = frac * group.setdefault("initial_lr", group["lr"])

        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            resets[step] = tracker.reset
            if agent.gsde and step % (args.sde_sample_freq or args.num_steps) == 0:
                noise = agent.sample_noise(args.num_envs, rng)  # at each rollout's start and every sde_sample_freq
            actions[step], logprobs[step], values[step] = policy(obs[step], noise if agent.gsde else None)

            next_obs, reward, terminations[step], truncations[step], _ = envs.step(
                to_env_action(actions[step], envs.single_action_space)
            )
            next_obs = prepare(next_obs)
            rewards[step] = return_scaler(reward, resets[step])
            for episode_return, episode_length in tracker.step(reward, terminations[step], truncations[step]):
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
        b_obs = torch.from_numpy(obs.reshape(-1, *obs_shape)[transition]).to(device)
        b_actions = torch.from_numpy(actions.reshape(-1, actions.shape[-1])[transition]).to(device)
        b_logprobs, b_advantages, b_returns, b_values = (
            torch.from_numpy(x.reshape(-1)[transition]).to(device) for x in (logprobs, advantages, returns, values)
        )

        stats, num_updates = {}, 0  # each loss statistic, by name, summed over the minibatches
        for epoch in range(args.update_epochs):
            if args.recompute_adv and epoch > 0:
                with torch.no_grad():
                    new_values = agent.get_value(torch.from_numpy(obs.reshape(-1, *obs_shape)).to(device))
                    next_value = agent.get_value(torch.from_numpy(next_obs).to(device)).cpu().numpy()
                advantages, returns = compute_gae(
                    rewards, new_values.cpu().numpy().reshape(values.shape), terminations, truncations, resets,
                    next_value, args.gamma, args.gae_lambda,
                )  # fmt: skip
                b_advantages, b_returns = (
                    torch.from_numpy(x.reshape(-1)[transition]).to(device) for x in (advantages, returns)
                )
            for mb_inds in torch.randperm(len(b_obs), device=device).tensor_split(args.num_minibatches):
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
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
                    "obs_rms": prepare.obs_norm.state_dict(),
                    "return_rms": return_scaler.state_dict(),
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
