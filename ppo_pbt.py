"""ppo_pbt.py: ppo.py + a population over MPI ranks (population-based training).

Each rank trains one member. --learning-rate, --ent-coef, --clip-coef, --gae-lambda and --update-epochs take a range
(LO HI): the members start spread over each (a centred Latin hypercube, every range's strata taken once). Every
--evolve-interval iterations they share their fitness, the mean return of their episodes since the last evolution;
the least fit --truncation each copy the winner of a tournament among the others (weights, optimizer state and
hyperparameters) if its returns are higher by --copy-threshold standard errors (Welch's t), then perturb the
hyperparameters (x0.8 or x1.2, or drawn anew), within the ranges. Jaderberg et al. 2017, "Population Based Training
of Neural Networks", https://arxiv.org/abs/1711.09846. Rank 0 writes population.csv, each member's curves in
member{rank}/ and the fittest member's checkpoint.

    mpiexec -n 4 .venv/bin/python ppo_pbt.py --total-timesteps 100000                 # 4 members on CartPole-v1
    mpiexec -n 4 .venv/bin/python ppo_pbt.py --env-id Acrobot-v1 --learning-rate 1e-5 1e-2 --total-timesteps 200000
    mpiexec -n 4 .venv/bin/python ppo_pbt.py --evolve-interval 0                       # no evolution: a random search
"""

import contextlib
import io
import math
import os
import random
import sys
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, replace

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
    total_timesteps: int = 500000
    """environment steps of each member, all its envs together"""
    learning_rate: tuple[float, float] = (1e-4, 1e-3)
    """the range (LO HI) of the members' learning rates, spread log-uniformly (equal ends: one value for all)"""
    num_envs: int = 4
    """the number of parallel environments"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """if toggled, the learning rate decays linearly to 0 over the run"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: tuple[float, float] = (0.9, 0.99)
    """the range (LO HI) of the members' lambdas of the general advantage estimation"""
    num_minibatches: int = 4
    """the number of minibatches per update epoch"""
    update_epochs: tuple[int, int] = (2, 8)
    """the range (LO HI) of the members' numbers of epochs over the rollout per update"""
    norm_adv: bool = True
    """if toggled, advantages are normalised per minibatch"""
    clip_coef: tuple[float, float] = (0.1, 0.3)
    """the range (LO HI) of the members' surrogate clipping coefficients"""
    clip_vloss: bool = True
    """if toggled, the value loss is clipped as in the PPO paper's code"""
    ent_coef: tuple[float, float] = (0.0, 0.02)
    """the range (LO HI) of the members' coefficients of the entropy bonus"""
    vf_coef: float = 0.5
    """the coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum norm of the gradient (clipped above it)"""
    target_kl: float | None = None
    """stop the update epochs early once the approximate KL passes this (None: never)"""

    # Population-based training
    evolve_interval: int = 10
    """the members evolve every this many iterations (0: never; the population is then a random search)"""
    truncation: float = 0.25
    """the fraction of the members, the least fit, that copy a fitter member at each evolution (at least one)"""
    tournament_size: int = 2
    """the number of fitter members drawn for the tournament whose winner a least fit member copies"""
    copy_threshold: float = 1.96
    """a least fit member copies only if the winner's mean return is higher by this many standard errors (Welch's t)"""
    resample_probability: float = 0.25
    """the chance that a copy draws a hyperparameter anew from its range instead of scaling it by 0.8 or 1.2"""


EVOLVED = ("learning_rate", "ent_coef", "clip_coef", "gae_lambda", "update_epochs")


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


def check_population(args: Args) -> str | None:
    """The first thing wrong with the ranges and the evolution's flags; None if none (each range's ends are checked
    as ppo.py's flags by check_args)."""
    checks = [(not low <= high, f"--{flag.replace('_', '-')} {low} {high}: a range's first end may not exceed its "
               "second") for flag in EVOLVED for low, high in [getattr(args, flag)]]  # fmt: skip
    checks += [
        (args.evolve_interval < 0, f"--evolve-interval {args.evolve_interval} must be 0 (no evolution) or more"),
        (not 0 < args.truncation < 1, f"--truncation {args.truncation} must lie between 0 and 1, e.g. 0.25"),
        (args.tournament_size < 1, f"--tournament-size {args.tournament_size} must be 1 or more"),
        (not 0 <= args.copy_threshold < np.inf, f"--copy-threshold {args.copy_threshold} must be 0 or positive"),
        (not 0 <= args.resample_probability <= 1, f"--resample-probability {args.resample_probability} must lie in "
         "[0, 1]"),
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


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, envs):
        super().__init__()
        obs_dim = int(np.prod(envs.single_observation_space.shape))
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
            layer_init(nn.Linear(64, envs.single_action_space.n), std=0.01),
        )

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        # the categorical distribution written out: torch.distributions' bookkeeping costs more than this network
        logprobs = self.actor(x).log_softmax(-1)
        if action is None:  # Gumbel-max: the largest of the log-probabilities plus Gumbel noise is a sample
            action = (logprobs - torch.empty_like(logprobs).exponential_().log()).argmax(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        return action, logprobs.gather(-1, action.unsqueeze(-1)).squeeze(-1), entropy, self.critic(x)


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


def greedy_action(agent: Agent, x: torch.Tensor, n: int) -> torch.Tensor:
    """The most likely of the n actions at each observation of x, by get_action_and_value's log-probability of each:
    any Agent with CleanRL's interface plays greedily."""
    every_action = torch.arange(n, device=x.device).repeat(len(x))
    _, logprob, _, _ = agent.get_action_and_value(x.repeat_interleave(n, 0), every_action)
    return logprob.view(-1, n).argmax(1)


@torch.no_grad()
def evaluate(agent: Agent, env_id: str, episodes: int, seed: int, video_folder: str | None = None) -> list[float]:
    """The real returns of `episodes` episodes played with the greedy policy (each step's most likely action)."""
    envs = make_envs(env_id, 1, video_folder)
    device, n = next(agent.parameters()).device, envs.single_action_space.n
    obs, _ = envs.reset(seed=seed)
    returns = []
    while len(returns) < episodes:
        action = greedy_action(agent, torch.as_tensor(obs, dtype=torch.float32, device=device), n)
        obs, _, _, _, info = envs.step(action.cpu().numpy())
        if "episode" in info:
            returns += info["episode"]["r"][info["_episode"]].tolist()
    envs.close()
    print(f"eval {env_id}: {np.mean(returns):.2f} ± {np.std(returns):.2f} over {episodes} greedy episodes")
    return returns


def hyperparameter(flag: str, low, high, position: float):
    """The value at position (0 to 1) along the range [low, high] of flag: geometric for the learning rate."""
    value = low * (high / low) ** position if flag == "learning_rate" else low + (high - low) * position
    return round(value) if flag == "update_epochs" else float(value)


def initial_population(args: Args, size: int, rng: np.random.Generator) -> list[dict]:
    """Each member's hyperparameters, a centred Latin hypercube: every range cut into `size` equal strata, each member
    given the centre of one stratum of every range, the strata of each range dealt in their own random order."""
    population = [{} for _ in range(size)]
    for flag in EVOLVED:
        for member, stratum in zip(population, rng.permutation(size).tolist()):
            member[flag] = hyperparameter(flag, *getattr(args, flag), (stratum + 0.5) / size)
    return population


def perturb(hyperparameters: dict, args: Args, rng: np.random.Generator) -> dict:
    """A copy's hyperparameters: each drawn anew from its range with --resample-probability, else scaled by 0.8 or
    1.2 (a number of epochs moves by one at least); all kept within their ranges."""
    perturbed = {}
    for flag, value in hyperparameters.items():
        low, high = getattr(args, flag)
        if rng.random() < args.resample_probability:
            value = hyperparameter(flag, low, high, rng.random())
        else:
            factor = (0.8, 1.2)[rng.integers(2)]
            scaled = round(value * factor) if flag == "update_epochs" else value * factor
            value = value + (1 if factor > 1 else -1) if scaled == value and flag == "update_epochs" else scaled
        perturbed[flag] = min(max(value, low), high)
    return perturbed


def select(returns: list[list], args: Args, rng: np.random.Generator) -> dict:
    """{member: the member it copies}, from each member's returns since the last evolution: ranked by their mean (a
    member with fewer than 2 episodes sits out), the last --truncation (at least one) each draw --tournament-size of
    the others and copy the fittest entrant if its mean is higher by more than --copy-threshold standard errors
    (Welch's t statistic, Jaderberg et al.'s t-test selection), so that noise alone moves no weights."""
    stats = {m: (np.mean(r), np.var(r, ddof=1) / len(r)) for m, r in enumerate(returns) if len(r) >= 2}
    ranked = sorted(stats, key=lambda m: -stats[m][0])
    num_copies = min(len(ranked) - 1, math.ceil(args.truncation * len(ranked)))
    plan = {}
    for member in ranked[len(ranked) - num_copies :] if num_copies > 0 else []:
        entrants = rng.choice(len(ranked) - num_copies, min(args.tournament_size, len(ranked) - num_copies), False)
        parent = ranked[int(entrants.min())]  # the survivors are in order of fitness: the first entrant is fittest
        (mean, squared_error), (parent_mean, parent_squared_error) = stats[member], stats[parent]
        if parent_mean - mean > args.copy_threshold * math.sqrt(squared_error + parent_squared_error):
            plan[member] = parent
    return plan


def wait_for_all(comm: MPI.Comm) -> None:
    """A barrier that waits asleep: MPICH's blocking calls poll at full speed, taking a core from the members still
    training when the ranks outnumber the cores."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.001)


def exchange(comm: MPI.Comm, plan: dict, state: dict) -> dict | None:
    """Carry out a plan of select: this rank's state goes to each member that copies it, serialised as a checkpoint
    is; a member that copies returns the state it receives (read with weights_only: data, no code), others None. No
    rank both sends and receives, so the blocking calls cannot wait on each other in a cycle."""
    for member, parent in plan.items():
        if comm.rank == parent:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            comm.send(buffer.getvalue(), dest=member)
        elif comm.rank == member:
            return torch.load(io.BytesIO(comm.recv(source=parent)), weights_only=True)
    return None


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
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    ends = [replace(args, **{flag: getattr(args, flag)[end] for flag in EVOLVED}) for end in (0, 1)]
    if message := check_population(args) or check_args(ends[0]) or check_args(ends[1]):
        fail(message)
    # This member's hyperparameters: the same draws on every rank, each taking its own; `ranges` keeps the flags.
    population = initial_population(args, size, np.random.default_rng(args.seed))
    ranges, args = args, replace(args, **population[rank])
    if args.eval_checkpoint and rank > 0:
        return
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

    # A resumed run seeds from the step it resumes at (not to replay its start's episodes), each rank after the last.
    seed = args.seed + global_step + rank * args.num_envs
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # One thread: at a 64x64 MLP's size a second one costs more in synchronisation than it brings.
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    try:
        envs = make_envs(args.env_id, 1 if args.eval_checkpoint else args.num_envs)
    except (gym.error.Error, ImportError) as e:
        fail(f"--env-id {args.env_id}: {e}")
    space = envs.single_action_space
    if not isinstance(space, gym.spaces.Discrete) or space.start != 0:
        fail(f"--env-id {args.env_id}: its actions are {type(space).__name__}; ppo.py takes Discrete ones from 0 "
             "(ppo_continuous.py: Box, ppo_masked.py: MultiDiscrete and MultiBinary)")  # fmt: skip
    agent = Agent(envs).to(device)
    if checkpoint:
        try:
            agent.load_state_dict(checkpoint["model"])
        except RuntimeError:
            fail(f"{flag}: the checkpoint's network does not fit this Agent on {args.env_id}")
    if args.eval_checkpoint:
        envs.close()
        video_folder = os.path.join(os.path.dirname(args.eval_checkpoint), "videos") if args.capture_video else None
        evaluate(agent, args.env_id, args.eval_episodes, seed, video_folder)
        return

    # Fused Adam: one kernel for all parameters instead of a loop over them
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        run_dir = os.path.dirname(os.path.abspath(args.resume))  # its curves go on in its own folder
    else:
        run_name = f"{args.env_id.rpartition(':')[2]}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = comm.bcast(os.path.join("runs", run_name))  # rank 0's
    os.makedirs(run_dir, exist_ok=True)
    if args.track and rank == 0:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=os.path.basename(run_dir), dir=run_dir, save_code=True)  # fmt: skip
    writer = SummaryWriter(os.path.join(run_dir, f"member{rank}"))
    table = "\n".join(f"|{key}|{value}|" for key, value in asdict(ranges).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    if rank == 0:  # at the start and at each evolution, per member: its fitness, its parent, its hyperparameters
        population_csv = open(os.path.join(run_dir, "population.csv"), "a", buffering=1)
        population_csv.write("" if population_csv.tell() else ",".join(["global_step", "member", "fitness", "parent",
                                                                         *EVOLVED]) + "\n")  # fmt: skip
        population_csv.writelines(f"{global_step},{m},nan,{m},{','.join(map(str, p.values()))}\n"
                                  for m, p in enumerate(population))  # fmt: skip
    fitness_returns = deque(maxlen=100)  # this member's returns since the last evolution, the last 100 at most

    # Rollout storage, [num_steps, num_envs, ...]
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long).to(device)
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
    progress = tqdm(total=num_iterations * batch_size, initial=global_step, unit="step", smoothing=0.1, disable=rank)

    for iteration in range(global_step // batch_size + 1, num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        with torch.inference_mode():  # the rollout: no autograd bookkeeping at all
            for step in range(args.num_steps):
                global_step += args.num_envs
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
                        fitness_returns.append(info["episode"]["r"][i])
                    progress.set_postfix(episodic_return=info["episode"]["r"][info["_episode"]].mean(), refresh=False)

            next_value = agent.get_value(next_obs).flatten().cpu().numpy()
        advantages, returns = compute_gae(
            rewards, values.cpu().numpy(), terminations, truncations, resets, next_value, args.gamma, args.gae_lambda
        )

        # flatten the batch, without the reset steps of next-step autoreset (no transitions)
        keep = torch.from_numpy(~resets.flatten()).to(device)
        b_obs = obs.flatten(0, 1)[keep]
        b_logprobs = logprobs.flatten()[keep]
        b_actions = actions.flatten()[keep]
        b_advantages = torch.from_numpy(advantages.flatten()).to(device)[keep]
        b_returns = torch.from_numpy(returns.flatten()).to(device)[keep]
        b_values = values.flatten()[keep]

        # Optimizing the policy and value network
        stats = torch.zeros(6, device=device)  # the losses below, summed over the minibatches
        num_updates = 0
        for epoch in range(args.update_epochs):
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

        # Evolution, and the fittest member's checkpoint: every rank waits for the others (asleep), then all share
        # their fitness, the mean return of their episodes since the last evolution.
        evolve = args.evolve_interval and iteration % args.evolve_interval == 0 and iteration < num_iterations
        if evolve or args.save_interval and iteration % args.save_interval == 0 or iteration == num_iterations:
            wait_for_all(comm)
            member_returns = comm.allgather(list(fitness_returns))
            fitness = [float(np.mean(r)) if r else np.nan for r in member_returns]
            fittest = int(np.nanargmax(fitness)) if not np.isnan(fitness).all() else 0
            state = dict(model=agent.state_dict(), optimizer=optimizer.state_dict(), hyperparameters=population[rank])
            best = exchange(comm, {0: fittest} if fittest else {}, state) or state  # rank 0 writes the fittest's
            if rank == 0:
                save_checkpoint(checkpoint_path, {"script": os.path.basename(__file__), "global_step": global_step,
                                                  "args": asdict(replace(ranges, **best["hyperparameters"])),
                                                  "model": best["model"], "optimizer": best["optimizer"]})  # fmt: skip
            plan = select(member_returns, ranges, np.random.default_rng([args.seed, iteration])) if evolve else {}
            copied = exchange(comm, plan, state)
            for member, parent in plan.items():  # every rank draws every copy's values: the same on every rank
                population[member] = perturb(
                    population[parent], ranges, np.random.default_rng([args.seed, iteration, member])
                )
            args = replace(ranges, **population[rank])
            if copied:
                agent.load_state_dict(copied["model"])
                optimizer.load_state_dict(copied["optimizer"])
            if evolve:
                fitness_returns.clear()
            if rank == 0:
                population_csv.writelines(
                    f"{global_step},{m},{fitness[m]},{plan.get(m, m)},{','.join(map(str, p.values()))}\n"
                    for m, p in enumerate(population)
                )

    progress.close()
    if rank > 0:
        return writer.close()
    agent.load_state_dict(best["model"])  # the fittest member's, as the checkpoint holds it
    print(f"the fittest member, {fittest}, returned {fitness[fittest]:.2f} since the last evolution")
    recent = np.mean(envs.return_queue) if envs.return_queue else np.nan  # RecordEpisodeStatistics' last 100
    print(f"done: {global_step:,} steps in {time.time() - start_time:.1f} s ({sps:,} SPS); mean return of the last "
          f"{len(envs.return_queue)} episodes {recent:.2f}; checkpoint {checkpoint_path}")  # fmt: skip
    envs.close()
    if args.eval_episodes:
        video_folder = os.path.join(run_dir, "videos") if args.capture_video else None
        returns = evaluate(agent, args.env_id, args.eval_episodes, seed, video_folder)
        writer.add_scalar("eval/episodic_return", np.mean(returns), global_step)
    writer.close()
    if args.track:
        wandb.finish()


if __name__ == "__main__":
    with contextlib.redirect_stderr(sys.stderr if MPI.COMM_WORLD.rank == 0 else io.StringIO()):
        args = tyro.cli(Args)  # a flag it cannot parse: its message once, from rank 0
    try:
        main(args)
    except Exception:  # a rank that stops alone would leave the others waiting in a collective call for ever
        fail(traceback.format_exc().rstrip(), 1)
