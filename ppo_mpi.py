"""ppo_mpi.py: ppo_continuous.py + data-parallel MPI ranks (the successor of Stable Baselines' PPO1).

Every rank steps its own --num-envs envs and computes the gradient of its own minibatches; the gradients are averaged
over the ranks in one Allreduce, so every rank takes the same step and the parameters stay identical. The observation
and return statistics are merged over the ranks after every rollout. A batch is all ranks' steps (ranks x --num-envs x
--num-steps) and --total-timesteps counts them all; rank 0 logs, writes the checkpoint (which resumes on any number of
ranks) and evaluates. An error on one rank ends them all.

Paper: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347
Details: Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization", ICLR blog track.

    mpiexec -n 2 .venv/bin/python ppo_mpi.py --env-id InvertedPendulum-v4     # balances it, 1M steps over 2 ranks
    # Tianshou's MuJoCo recipe in ReLU units over 2 ranks of 4 envs: the batch of ppo_continuous.py's 8
    mpiexec -n 2 .venv/bin/python ppo_mpi.py --num-envs 4 --num-steps 256 --ent-coef 0 --vf-coef 0.25 --no-clip-vloss \
        --no-norm-adv --recompute-adv --log-std-init -0.5 --activation relu
    python ppo_mpi.py --eval-checkpoint runs/RUN/checkpoint.pt --capture-video
"""

import contextlib
import io
import math
import os
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Literal
from unittest import mock

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from gymnasium.wrappers.utils import RunningMeanStd
from mpi4py import MPI
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
    env_id: str = "HalfCheetah-v4"
    """the id of the environment: a gymnasium id, or `module:EnvId-v0` for one your module registers"""
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
    """the discount factor gamma"""
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
    log_std_init: float = 0.0
    """the initial log standard deviation of the Gaussian policy"""
    hidden_size: int = 64
    """the width of the two hidden layers of the actor and of the critic"""
    activation: Literal["tanh", "relu"] = "tanh"
    """the nonlinearity of the hidden layers"""
    recompute_adv: bool = False
    """if toggled, the advantages are recomputed with the current critic before every epoch (as Tianshou's PPO)"""


def fail(message: str, status: int = 2):
    """One line on stderr, then exit: 2 for bad input (alike on every rank: rank 0 says it), 1 for a failed run (on
    one rank, maybe: MPI_Abort ends them all)."""
    comm = MPI.COMM_WORLD
    if status == 1 or comm.rank == 0:
        print(f"error: {f'rank {comm.rank}: ' if status == 1 and comm.size > 1 else ''}{message}", file=sys.stderr,
              flush=True)  # fmt: skip
    if status == 1 and comm.size > 1:
        time.sleep(0.5)  # time for mpiexec to pass the line on: MPI_Abort can drop what a rank wrote just before it
        comm.Abort(status)
    sys.exit(status)


def check_args(args: Args) -> str | None:
    """The first thing wrong with the flags, as a message naming the flag, its value and what works; None if none."""
    batch_size = args.num_envs * args.num_steps
    positive = ["num_envs", "num_steps", "num_minibatches", "update_epochs", "learning_rate", "clip_coef"]
    positive += ["hidden_size"]
    checks = [
        (not 0 < getattr(args, flag) < np.inf, f"--{flag.replace('_', '-')} {getattr(args, flag)} must be positive")
        for flag in positive + ["max_grad_norm"] + ["target_kl"] * (args.target_kl is not None)
    ]
    checks += [
        (batch_size % max(args.num_minibatches, 1), f"--num-minibatches {args.num_minibatches} does not divide the "
         f"batch of {batch_size} (--num-envs {args.num_envs} x --num-steps {args.num_steps})"),
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
        # any observation space (Discrete, Dict, Tuple, images, ...) as one flat vector, as SB3 flattens it
        return gym.wrappers.FlattenObservation(env)

    envs = gym.vector.SyncVectorEnv([make_env] * num_envs, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


class Normalize(gym.vector.VectorWrapper):
    """Clips the actions to their bounds and normalises the observations by obs_rms (then clips them to +-10). In
    training (return_rms given) both statistics update and the rewards are scaled by the running std of the discounted
    return (then clipped to +-10), the reset steps of next-step autoreset left out; without return_rms the observation
    statistics stay frozen (evaluation). What gymnasium's ClipAction, NormalizeObservation and NormalizeReward do, in
    one wrapper: their chain costs more than the MuJoCo step itself."""

    def __init__(self, envs, obs_rms: RunningMeanStd, return_rms: RunningMeanStd | None = None, gamma: float = 0.99):
        super().__init__(envs)
        self.obs_rms, self.return_rms, self.gamma = obs_rms, return_rms, gamma
        self.returns, self.resets = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=bool)

    def normalize(self, obs):
        if self.return_rms is not None:
            self.obs_rms.update(obs)
        return np.clip((obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + 1e-8), -10, 10).astype(np.float32)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self.normalize(obs), info

    def step(self, actions):
        space = self.env.single_action_space
        obs, rewards, terminations, truncations, info = self.env.step(np.clip(actions, space.low, space.high))
        if self.return_rms is not None:
            self.returns = self.returns * self.gamma + rewards
            if not self.resets.all():
                self.return_rms.update(self.returns[~self.resets])
            self.resets = terminations | truncations
            self.returns[self.resets] = 0
            rewards = np.clip(rewards / np.sqrt(self.return_rms.var + 1e-8), -10, 10)
        return self.normalize(obs), rewards, terminations, truncations, info


def merge_statistics(comm: MPI.Comm, rms: RunningMeanStd, prior: tuple) -> tuple:
    """Each rank's statistics cover the data before the last merge (prior: count, mean, var, alike on every rank) and
    the rank's own since; make every rank's cover the prior and all the ranks' data since, exactly (in sums of x and
    x^2). Returns the new prior."""
    count, mean, var = prior
    total, squares = rms.count * rms.mean, rms.count * (rms.var + rms.mean**2)  # sums of x and of x^2
    prior_total, prior_squares = count * mean, count * (var + mean**2)
    sums = comm.allreduce(
        np.hstack([rms.count - count, (total - prior_total).ravel(), (squares - prior_squares).ravel()])
    )
    rms.count = count + sums[0]
    rms.mean = (prior_total + sums[1 : 1 + mean.size].reshape(mean.shape)) / rms.count
    rms.var = (prior_squares + sums[1 + mean.size :].reshape(mean.shape)) / rms.count - rms.mean**2
    return rms.count, rms.mean.copy(), rms.var.copy()


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, envs, hidden_size=64, activation="tanh", log_std_init=0.0):
        super().__init__()
        obs_dim = int(np.prod(envs.single_observation_space.shape))
        act_dim = int(np.prod(envs.single_action_space.shape))
        Activation = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)),
            Activation(),
            layer_init(nn.Linear(hidden_size, hidden_size)),
            Activation(),
            layer_init(nn.Linear(hidden_size, 1), std=1.0),
        )
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)),
            Activation(),
            layer_init(nn.Linear(hidden_size, hidden_size)),
            Activation(),
            layer_init(nn.Linear(hidden_size, act_dim), std=0.01),
        )
        self.actor_logstd = nn.Parameter(torch.full((1, act_dim), float(log_std_init)))

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        action_mean = self.actor_mean(x)
        action_logstd = self.actor_logstd.expand_as(action_mean)
        if action is None:
            action = action_mean + action_logstd.exp() * torch.randn_like(action_mean)
        # the diagonal Gaussian written out: torch.distributions' argument checks cost more than this network
        log_2pi = math.log(2 * math.pi)
        logprob = -0.5 * ((action - action_mean) / action_logstd.exp()) ** 2 - action_logstd - 0.5 * log_2pi
        entropy = 0.5 + 0.5 * log_2pi + action_logstd
        return action, logprob.sum(1), entropy.sum(1), self.critic(x)


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
def evaluate(agent: Agent, env_id: str, episodes: int, seed: int, obs_rms: RunningMeanStd,
             video_folder: str | None = None) -> list[float]:  # fmt: skip
    """The real returns of `episodes` episodes played with the greedy policy (the Gaussian's mean), the observation
    statistics frozen."""
    envs = Normalize(make_envs(env_id, 1, video_folder), obs_rms)
    device = next(agent.parameters()).device
    obs, _ = envs.reset(seed=seed)
    returns = []
    while len(returns) < episodes:
        action = agent.actor_mean(torch.as_tensor(obs, dtype=torch.float32, device=device))
        obs, _, _, _, info = envs.step(action.cpu().numpy())
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
    if message := check_args(args):
        fail(message)
    checkpoint, flag = None, "--eval-checkpoint" if args.eval_checkpoint else "--resume"
    if args.eval_checkpoint or args.resume:
        checkpoint = load_checkpoint(args.eval_checkpoint or args.resume, flag)
        if args.eval_checkpoint:  # the checkpoint's env, whatever --env-id says
            args.env_id = checkpoint["args"]["env_id"]
        elif checkpoint["args"]["env_id"] != args.env_id:
            fail(f"--resume: the checkpoint trained on {checkpoint['args']['env_id']}; pass --env-id with it")
    comm = MPI.COMM_WORLD
    batch_size = comm.size * args.num_envs * args.num_steps  # all ranks' steps
    num_iterations = args.total_timesteps // batch_size
    if not num_iterations and not args.eval_checkpoint:
        fail(
            f"--total-timesteps {args.total_timesteps} is less than one batch of {comm.size} ranks' {batch_size} steps"
        )
    global_step = checkpoint["global_step"] if args.resume else 0
    if global_step >= num_iterations * batch_size and args.resume:
        fail(f"--resume: the checkpoint is at step {global_step:,} already; raise --total-timesteps")

    # A resumed run seeds from the step it resumes at, so that it does not replay the episodes of its start. Each rank
    # its own episodes: env i of a rank is seeded seed + i, so a rank's envs take the seeds after the ranks' before it.
    seed = args.seed + global_step + comm.rank * args.num_envs
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # One thread: at a 64x64 MLP's size a second one costs more in synchronisation than it brings.
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    try:
        episodes = make_envs(args.env_id, 1 if args.eval_checkpoint else args.num_envs)
    except (gym.error.Error, ImportError) as e:
        fail(f"--env-id {args.env_id}: {e}")
    if not isinstance(episodes.single_action_space, gym.spaces.Box):
        fail(f"--env-id {args.env_id}: its actions are {type(episodes.single_action_space).__name__}; "
             "ppo_continuous.py takes Box ones (ppo.py: Discrete)")  # fmt: skip
    # the normalisation statistics: the observations' and the discounted return's running mean and variance
    obs_rms, return_rms = RunningMeanStd(shape=episodes.single_observation_space.shape), RunningMeanStd(shape=())
    envs = Normalize(episodes, obs_rms, return_rms, args.gamma)
    agent = Agent(envs, args.hidden_size, args.activation, args.log_std_init).to(device)
    if checkpoint:
        try:
            agent.load_state_dict(checkpoint["model"])
            for rms, key in ((obs_rms, "obs_rms"), (return_rms, "return_rms")):
                vars(rms).update({name: value.numpy() for name, value in checkpoint[key].items()})
        except RuntimeError:
            fail(f"{flag}: the checkpoint's network does not fit this Agent on {args.env_id}")
    if args.eval_checkpoint:
        envs.close()
        video_folder = os.path.join(os.path.dirname(args.eval_checkpoint), "videos") if args.capture_video else None
        if comm.rank == 0:
            evaluate(agent, args.env_id, args.eval_episodes, seed, obs_rms, video_folder)
        return
    agent.load_state_dict(comm.bcast(agent.state_dict()))  # rank 0's initial parameters on every rank
    priors = [(rms, (rms.count, rms.mean.copy(), rms.var.copy())) for rms in (obs_rms, return_rms)]

    # Fused Adam: one kernel for all parameters instead of a loop over them
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        run_dir = os.path.dirname(os.path.abspath(args.resume))  # its curves go on in its own folder
    else:
        run_name = f"{args.env_id.rpartition(':')[2]}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = comm.bcast(os.path.join("runs", run_name))  # rank 0's
    os.makedirs(run_dir, exist_ok=True)
    if args.track and comm.rank == 0:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=os.path.basename(run_dir), dir=run_dir, save_code=True)  # fmt: skip
    writer = SummaryWriter(run_dir) if comm.rank == 0 else mock.Mock()  # the other ranks log nothing
    table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    # Rollout storage, [num_steps, num_envs, ...]
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    # what the envs return stays in NumPy, where GAE runs: one copy to the device instead of one a step
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    truncations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    resets = np.zeros((args.num_steps, args.num_envs), dtype=bool)

    next_obs, _ = envs.reset(seed=seed)
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
    next_reset = np.zeros(args.num_envs, dtype=bool)  # the envs whose next step is a reset step
    start_time, start_step = time.time(), global_step
    progress = tqdm(total=num_iterations * batch_size, initial=global_step, unit="step", smoothing=0.1,
                    disable=comm.rank > 0)  # fmt: skip

    for iteration in range(global_step // batch_size + 1, num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        with torch.inference_mode():  # the rollout: no autograd bookkeeping at all
            for step in range(args.num_steps):
                global_step += args.num_envs * comm.size
                obs[step] = next_obs
                resets[step] = next_reset
                action, logprob, _, value = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
                actions[step] = action
                logprobs[step] = logprob

                next_obs, rewards[step], terminations[step], truncations[step], info = envs.step(action.cpu().numpy())
                if not np.isfinite(next_obs).all():  # a broken env: stop before sampling from it
                    fail(f"step {global_step}: NaN or infinity in the observations; the last checkpoint is good", 1)
                next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
                next_reset = terminations[step] | truncations[step]
                if "episode" in info:
                    for i in np.flatnonzero(info["_episode"]):
                        writer.add_scalar("charts/episodic_return", info["episode"]["r"][i], global_step)
                        writer.add_scalar("charts/episodic_length", info["episode"]["l"][i], global_step)
                    progress.set_postfix(episodic_return=info["episode"]["r"][info["_episode"]].mean(), refresh=False)

            next_value = agent.get_value(next_obs).flatten().cpu().numpy()
        advantages, returns = compute_gae(
            rewards, values.cpu().numpy(), terminations, truncations, resets, next_value, args.gamma, args.gae_lambda
        )
        priors = [(rms, merge_statistics(comm, rms, prior)) for rms, prior in priors]

        # flatten the batch, without the reset steps of next-step autoreset (no transitions)
        keep = torch.from_numpy(~resets.flatten()).to(device)
        b_obs = obs.flatten(0, 1)[keep]
        b_logprobs = logprobs.flatten()[keep]
        b_actions = actions.flatten(0, 1)[keep]
        b_advantages = torch.from_numpy(advantages.flatten()).to(device)[keep]
        b_returns = torch.from_numpy(returns.flatten()).to(device)[keep]
        b_values = values.flatten()[keep]

        # Optimizing the policy and value network
        stats = torch.zeros(6, device=device)  # the losses below, summed over the minibatches
        num_updates = 0
        for epoch in range(args.update_epochs):
            if args.recompute_adv and epoch > 0:  # the advantages of the critic as it is now
                with torch.no_grad():
                    new_values = agent.get_value(obs.flatten(0, 1)).view_as(values).cpu().numpy()
                    next_value = agent.get_value(next_obs).flatten().cpu().numpy()
                advantages, returns = compute_gae(
                    rewards, new_values, terminations, truncations, resets, next_value, args.gamma, args.gae_lambda
                )
                b_advantages = torch.from_numpy(advantages.flatten()).to(device)[keep]
                b_returns = torch.from_numpy(returns.flatten()).to(device)[keep]
            for mb_inds in torch.randperm(len(b_obs), device=device).tensor_split(args.num_minibatches):
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
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
                # the gradients averaged over the ranks in one Allreduce: every rank takes the same step
                grads = torch.cat([param.grad.flatten() for param in agent.parameters()]).cpu()
                comm.Allreduce(MPI.IN_PLACE, grads.numpy(), op=MPI.SUM)
                grads = (grads / comm.size).to(device)  # one copy to the device, then into each gradient's own layout
                for param, grad in zip(agent.parameters(), grads.split([p.numel() for p in agent.parameters()])):
                    param.grad.copy_(grad.view_as(param))
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                stats += torch.stack([v_loss, pg_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac]).detach()
                num_updates += 1

            if args.target_kl is not None and comm.allreduce(approx_kl.item()) / comm.size > args.target_kl:
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

        due = args.save_interval and iteration % args.save_interval == 0 or iteration == num_iterations
        if due and comm.rank == 0:
            statistics = {key: {name: torch.as_tensor(value, dtype=torch.float64) for name, value in vars(rms).items()}
                          for key, rms in (("obs_rms", obs_rms), ("return_rms", return_rms))}  # fmt: skip
            save_checkpoint(checkpoint_path, {"script": os.path.basename(__file__), "args": asdict(args),
                                              "global_step": global_step, "model": agent.state_dict(),
                                              "optimizer": optimizer.state_dict(), **statistics})  # fmt: skip

    progress.close()
    recent = np.mean(episodes.return_queue) if episodes.return_queue else np.nan  # RecordEpisodeStatistics' last 100
    if comm.rank == 0:
        print(f"done: {global_step:,} steps in {time.time() - start_time:.1f} s ({sps:,} SPS); mean return of the last "
              f"{len(episodes.return_queue)} episodes (rank 0) {recent:.2f}; checkpoint {checkpoint_path}")  # fmt: skip
    envs.close()
    if args.eval_episodes and comm.rank == 0:
        video_folder = os.path.join(run_dir, "videos") if args.capture_video else None
        returns = evaluate(agent, args.env_id, args.eval_episodes, seed, obs_rms, video_folder)
        writer.add_scalar("eval/episodic_return", np.mean(returns), global_step)
    writer.close()
    if args.track and comm.rank == 0:
        wandb.finish()


if __name__ == "__main__":
    with contextlib.redirect_stderr(sys.stderr if MPI.COMM_WORLD.rank == 0 else io.StringIO()):
        args = tyro.cli(Args)  # a flag it cannot parse: its message once, from rank 0
    try:
        main(args)
    except Exception:  # a rank that stops alone would leave the others waiting in a collective call for ever
        fail(traceback.format_exc().rstrip(), 1)
