"""What test_ppo_mpi.py runs on MPI ranks.

Imported, as `--env-id tests.ppo_mpi_ranks:CrashOnRank1-v0`, it registers a CartPole that fails on rank 1 alone.
Run as a script on every rank (`mpiexec -n 2 python tests/ppo_mpi_ranks.py`, in an empty folder: runs/ lands there),
it checks ppo_mpi.py's collective helpers and that training keeps every rank's network, optimizer and statistics
bit-identical; rank 0 then prints `ok`. A failed check prints its traceback and ends every rank (MPI_Abort).
`python tests/ppo_mpi_ranks.py crash-envpool FLAGS` runs ppo_mpi.py FLAGS as its command line does, with envpool's
envs (Atari's) failing on rank 1 after CRASH_AFTER_STEPS steps.
"""

import gymnasium as gym
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

CRASH_AFTER_STEPS = 300


class CrashOnRank1(CartPoleEnv):
    """CartPole whose envs on rank 1 raise after CRASH_AFTER_STEPS steps, in the middle of training: rank 0 is then
    waiting for rank 1 in a collective call, or soon will be."""

    steps = 0

    def step(self, action):
        from mpi4py import MPI  # already initialised by the script that steps this env

        self.steps += 1
        if MPI.COMM_WORLD.rank == 1 and self.steps > CRASH_AFTER_STEPS:
            raise RuntimeError("CrashOnRank1: the env broke on rank 1")
        return super().step(action)


gym.register(id="CrashOnRank1-v0", entry_point=f"{__name__}:CrashOnRank1", max_episode_steps=500)


def main() -> None:
    import contextlib
    import io
    import sys
    import traceback
    from pathlib import Path

    import numpy as np
    import torch
    from mpi4py import MPI

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ppo_mpi as pm

    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size

    def merged_statistics_are_those_of_all_ranks_data():
        # every rank draws the same data and takes its own part of it, of unequal sizes
        data = np.random.default_rng(0).normal(3.0, 2.0, (37 * size + 5, 2, 3))
        prior = np.random.default_rng(1).normal(0.0, 1.0, (9, 2, 3))
        parts = np.array_split(data, size)
        rms, expected = pm.RunningMeanStd((2, 3)), pm.RunningMeanStd((2, 3))
        rms.update(prior)
        pm.merge_across_ranks(comm, rms, parts[rank])
        expected.update(prior)
        expected.update(data)
        assert rms.count == expected.count
        np.testing.assert_allclose(rms.mean, expected.mean, rtol=1e-10)
        np.testing.assert_allclose(rms.var, expected.var, rtol=1e-10)
        empty = pm.RunningMeanStd((2, 3))
        pm.merge_across_ranks(comm, empty, parts[rank][:0] if rank else parts[rank])  # empty batches on ranks > 0
        expected = pm.RunningMeanStd((2, 3))
        expected.update(parts[0])
        np.testing.assert_allclose([empty.mean, empty.var], [expected.mean, expected.var], rtol=1e-10)

    def scaled_rewards_are_those_of_one_scaler_of_all_envs():
        num_steps, num_envs, gamma = 40, 3, 0.9
        rng = np.random.default_rng(2)
        rewards = rng.normal(1.0, 2.0, (size, num_steps, num_envs)).astype(np.float32)
        resets = rng.random((size, num_steps, num_envs)) < 0.1
        scaler = pm.ReturnScaler(size * num_envs, gamma)
        mine = pm.scale_rewards_across_ranks(comm, scaler, rewards[rank], resets[rank])
        # one process stepping all envs, rank 0's first: [num_steps, ranks x num_envs]
        reference = pm.ReturnScaler(size * num_envs, gamma)
        all_rewards, all_resets = (x.transpose(1, 0, 2).reshape(num_steps, -1) for x in (rewards, resets))
        expected = np.stack([reference(r, d) for r, d in zip(all_rewards, all_resets)])
        np.testing.assert_array_equal(mine, expected[:, rank * num_envs : (rank + 1) * num_envs])
        assert (scaler.count, scaler.mean, scaler.var) == (reference.count, reference.mean, reference.var)

    def differing_ranks_are_found_to_the_bit():
        a = np.linspace(0, 1, 7, dtype=np.float32)
        assert pm.differing_ranks(comm, [a, a]) == []
        b = a.copy()
        if rank == size - 1:
            b[3] = np.nextafter(b[3], np.float32(2))  # one ulp
        assert pm.differing_ranks(comm, [a, b]) == ([size - 1] if size > 1 else [])

    def a_setup_error_on_one_rank_stops_every_rank():
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), pm.on_every_rank(comm):
                if rank == size - 1:
                    raise pm.UserError("--resume x.pt: no such file")
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError("on_every_rank let the ranks go on")
        expected = f"error: {'' if size == 1 else f'rank {size - 1}: '}--resume x.pt: no such file\n"
        assert stderr.getvalue() == (expected if rank == 0 else ""), stderr.getvalue()

    def training_keeps_every_rank_identical():
        # The script's own end-of-training check, spied on: every rank's state, gathered whole and compared here.
        seen = []
        check = pm.differing_ranks

        def spy(comm, arrays):
            seen.append([np.array(a, copy=True) for a in arrays])
            return check(comm, arrays)

        pm.differing_ranks = spy
        small = dict(num_envs=2, num_steps=64, num_minibatches=2, update_epochs=2, eval_episodes=0)
        runs = [
            pm.Args(exp_name="cartpole", total_timesteps=1024, target_kl=0.005, lr_schedule="middle_drop", **small),
            pm.Args(exp_name="pendulum", env_id="Pendulum-v1", total_timesteps=1024, ent_coef=0.0, **small),
        ]
        try:
            for args in runs:
                pm.main(args, comm)
        finally:
            pm.differing_ranks = check
        assert len(seen) == len(runs)
        everyone = comm.gather(seen, root=0)
        if rank == 0:
            for other in everyone[1:]:
                for mine, theirs in zip(everyone[0], other):
                    assert len(mine) == len(theirs)
                    assert all(x.tobytes() == y.tobytes() for x, y in zip(mine, theirs))
            for args, state in zip(runs, seen):
                (run_dir,) = Path("runs").glob(f"*__{args.exp_name}__*")
                model = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
                flat = torch.cat([p.reshape(-1) for k, p in model.items() if k != "logit_padding"])
                assert np.array_equal(state[0], flat.numpy())  # the state compared is the network trained

    def a_divergence_fails_loudly():
        check, pm.differing_ranks = pm.differing_ranks, lambda comm, arrays: [1]
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                pm.main(
                    pm.Args(exp_name="diverged", total_timesteps=512, num_envs=2, num_steps=64, eval_episodes=0), comm
                )
        except SystemExit as e:
            assert e.code == 1
        else:
            raise AssertionError("a divergence went unnoticed")
        finally:
            pm.differing_ranks = check
        assert ("rank(s) [1] differ from rank 0's" in stderr.getvalue()) == (rank == 0), stderr.getvalue()

    checks = [
        merged_statistics_are_those_of_all_ranks_data,
        scaled_rewards_are_those_of_one_scaler_of_all_envs,
        differing_ranks_are_found_to_the_bit,
        a_setup_error_on_one_rank_stops_every_rank,
        training_keeps_every_rank_identical,
        a_divergence_fails_loudly,
    ]
    for check in checks:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the training runs' progress lines
                check()
        except BaseException:
            print(f"rank {rank}: {check.__name__} failed", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            comm.Abort(1)
    comm.Barrier()
    if rank == 0:
        print("ok:", ", ".join(check.__name__ for check in checks))


def crash_envpool_on_rank_1(flags: list) -> None:
    import runpy
    import sys
    from pathlib import Path

    import envpool
    from mpi4py import MPI

    class CrashingEnvs:
        def __init__(self, envs):
            self.envs, self.steps = envs, 0

        def __getattr__(self, name):
            return getattr(self.envs, name)

        def step(self, action):
            self.steps += 1
            if MPI.COMM_WORLD.rank == 1 and self.steps > CRASH_AFTER_STEPS // 10:
                raise RuntimeError("CrashingEnvs: the env broke on rank 1")
            return self.envs.step(action)

    make = envpool.make
    envpool.make = lambda *args, **kwargs: CrashingEnvs(make(*args, **kwargs))
    script = Path(__file__).resolve().parents[1] / "ppo_mpi.py"
    sys.argv = [str(script), *flags]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["crash-envpool"]:
        crash_envpool_on_rank_1(sys.argv[2:])
    else:
        main()
