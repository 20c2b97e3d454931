"""ppo_atari_mpi.py: ppo_atari.py + data-parallel MPI ranks, one GPU per rank where there are GPUs (PPO1's run_atari).

Every rank steps its own --num-envs games and computes the gradient of its own minibatches; the gradients are averaged
over the ranks in one Allreduce, so every rank takes the same step and the parameters stay identical. Where CUDA
exists each rank trains on GPU (local rank % GPUs), as CleanRL's ppo_atari_multigpu.py. A batch is all ranks' steps
(ranks x --num-envs x --num-steps) and --total-timesteps counts them all; rank 0 logs, writes the checkpoint (which
resumes on any number of ranks) and evaluates. An error on one rank ends them all.

Paper: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347
Details: Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization", ICLR blog track.

    mpiexec -n 2 .venv/bin/python ppo_atari_mpi.py --num-envs 4    # Breakout-v5, 10M steps: CleanRL's batch of 8 envs
    mpiexec -n 2 .venv/bin/python ppo_atari_mpi.py --env-id Pong-v5 --track
    python ppo_atari_mpi.py --eval-checkpoint runs/RUN/checkpoint.pt --capture-video
"""

import contextlib
import io
import os
import random
import sys
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from unittest import mock

import envpool
import numpy as np
import torch
import torch.nn as nn
import tyro
from gymnasium.utils.save_video import save_video
from mpi4py import MPI
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment, part of the run folder's name"""
    seed: int = 1
    """seed of random, numpy, torch and the environments"""
    cuda: bool = True
    """if toggled, each rank trains on a GPU where there are GPUs (local rank % GPUs)"""
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
    env_id: str = "Breakout-v5"
    """the id of one of envpool's Atari games, e.g. Breakout-v5, Pong-v5, BeamRider-v5"""
    total_timesteps: int = 10000000
    """total environment steps of the experiment, all envs together"""
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


def make_envs(env_id: str, num_envs: int, seed: int, video_folder: str | None = None):
    """The Atari games with the standard preprocessing (Machado et al. 2018), spelled out rather than left to envpool's
    defaults, seeded here (envpool ignores a seed given to reset). Next-step autoreset, as ppo.py's envs: the step after
    one that ends an episode (here a lost life too) only resets it, reward 0, ignoring its action."""
    envs = envpool.make(
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
        **({"render_mode": "rgb_array"} if video_folder else {}),
    )
    return RecordEpisodeStatistics(envs, video_folder)


class RecordEpisodeStatistics:
    """gymnasium's vector RecordEpisodeStatistics for envpool's games: info["episode"] holds the real score (the
    unclipped info["reward"]) and length of each whole game that a step ended, over all its lives (a game ends when
    the last life is lost, info["terminated"], or at the time limit); with video_folder, a video of each game of the
    first env there."""

    def __init__(self, envs, video_folder: str | None = None):
        self.envs, self.video_folder, self.frames, self.videos = envs, video_folder, [], 0
        self.single_observation_space, self.single_action_space = envs.observation_space, envs.action_space
        self.returns, self.return_queue = np.zeros(envs.config["num_envs"]), deque(maxlen=100)

    def reset(self, seed=None):
        return self.envs.reset()

    def step(self, actions):
        obs, rewards, terminations, truncations, info = self.envs.step(actions)
        self.returns += info["reward"]
        ended = info["terminated"].astype(bool) | truncations
        if ended.any():  # elapsed_step: the game's steps, not counting the reset steps after its lost lives
            info["episode"], info["_episode"] = {"r": self.returns.copy(), "l": info["elapsed_step"]}, ended
            self.return_queue.extend(self.returns[ended])
            self.returns[ended] = 0
        if self.video_folder:  # the full-colour screen, 60 frames a second shown 4 to a step: the game's speed
            self.frames.append(self.envs.render()[0])
            if ended[0]:
                save_video(self.frames, self.video_folder, lambda _: True, fps=15, episode_index=self.videos)
                self.frames, self.videos = [], self.videos + 1
        return obs, rewards, terminations, truncations, info

    def close(self):
        self.envs.close()


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, envs):
        super().__init__()
        channels, height, width = envs.single_observation_space.shape
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(channels, 32, 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():  # the size of the convolutions' output, from a blank frame stack
            features = self.network(torch.zeros(1, channels, height, width)).shape[1]
        self.network.append(layer_init(nn.Linear(features, 512)))
        self.network.append(nn.ReLU())
        self.actor = layer_init(nn.Linear(512, envs.single_action_space.n), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1)

    def get_value(self, x):
        return self.critic(self.network(x / 255.0))

    def get_action_and_value(self, x, action=None):
        hidden = self.network(x / 255.0)
        # the categorical distribution written out: torch.distributions' bookkeeping costs more than this network
        logprobs = self.actor(hidden).log_softmax(-1)
        if action is None:  # Gumbel-max: the largest of the log-probabilities plus Gumbel noise is a sample
            action = (logprobs - torch.empty_like(logprobs).exponential_().log()).argmax(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        return action, logprobs.gather(-1, action.unsqueeze(-1)).squeeze(-1), entropy, self.critic(hidden)


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
    envs = make_envs(env_id, 1, seed, video_folder)
    device, n = next(agent.parameters()).device, envs.single_action_space.n
    obs, _ = envs.reset(seed=seed)
    returns = []
    while len(returns) < episodes:
        action = greedy_action(agent, torch.as_tensor(obs, device=device), n)
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
    # Denormals flushed to zero: Adam's moments of dead units would otherwise decay into float32's subnormal range
    # and stay there (rounding keeps them from reaching zero), where CPUs compute them slowly.
    torch.set_flush_denormal(True)
    # torch's threads, the ranks of this machine sharing its cores; on GPUs, the ranks take them in turn
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    torch.set_num_threads(max(1, torch.get_num_threads() // local.size))
    cuda = torch.cuda.is_available() and args.cuda
    device = torch.device(f"cuda:{local.rank % torch.cuda.device_count()}" if cuda else "cpu")

    if envpool.registration.registry.specs.get(args.env_id, [None])[0] != "envpool.atari":
        fail(f"--env-id {args.env_id} is not one of envpool's Atari games, e.g. Breakout-v5 (ppo.py: gymnasium's)")
    envs = make_envs(args.env_id, 1 if args.eval_checkpoint else args.num_envs, seed)
    agent = Agent(envs).to(device, memory_format=torch.channels_last)  # the CPU's convolutions run faster so
    if checkpoint:
        try:
            agent.load_state_dict(checkpoint["model"])
        except RuntimeError:
            fail(f"{flag}: the checkpoint's network does not fit this Agent on {args.env_id}")
    if args.eval_checkpoint:
        envs.close()
        video_folder = os.path.join(os.path.dirname(args.eval_checkpoint), "videos") if args.capture_video else None
        if comm.rank == 0:
            evaluate(agent, args.env_id, args.eval_episodes, seed, video_folder)
        return
    agent.load_state_dict(comm.bcast(agent.state_dict()))  # rank 0's initial parameters on every rank

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
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape, dtype=torch.uint8).to(
        device
    )
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    # what the envs return stays in NumPy, where GAE runs: one copy to the device instead of one a step
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    truncations = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    resets = np.zeros((args.num_steps, args.num_envs), dtype=bool)

    next_obs, _ = envs.reset(seed=seed)
    next_obs = torch.as_tensor(next_obs, device=device)
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
                next_obs = torch.as_tensor(next_obs, device=device)
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

        # flatten the batch, without the reset steps of next-step autoreset (no transitions)
        keep = torch.from_numpy(~resets.flatten()).to(device)
        b_obs = obs.flatten(0, 1)[keep].contiguous(memory_format=torch.channels_last)  # as the weights
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
            save_checkpoint(checkpoint_path, {"script": os.path.basename(__file__), "args": asdict(args),
                                              "global_step": global_step, "model": agent.state_dict(),
                                              "optimizer": optimizer.state_dict()})  # fmt: skip

    progress.close()
    recent = np.mean(envs.return_queue) if envs.return_queue else np.nan  # RecordEpisodeStatistics' last 100
    if comm.rank == 0:
        print(f"done: {global_step:,} steps in {time.time() - start_time:.1f} s ({sps:,} SPS); mean return of the last "
              f"{len(envs.return_queue)} episodes (rank 0) {recent:.2f}; checkpoint {checkpoint_path}")  # fmt: skip
    envs.close()
    if args.eval_episodes and comm.rank == 0:
        video_folder = os.path.join(run_dir, "videos") if args.capture_video else None
        returns = evaluate(agent, args.env_id, args.eval_episodes, seed, video_folder)
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
