"""What test_ppo_pbt.py runs on MPI ranks: `mpiexec -n 3 python tests/ppo_pbt_ranks.py`. Each rank trains its own
network a few steps (so that Adam has a state), then members copy others by ppo_pbt.py's exchange; every copy must
then hold its parent's weights and optimizer state bit for bit. Rank 0 prints `ok`; a failed check prints its
traceback and ends every rank (MPI_Abort)."""

import hashlib
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI


def digest(agent, optimizer) -> str:
    """SHA-256 of the weights and of every tensor and number of the optimizer's state, learning rates excluded."""
    state = optimizer.state_dict()
    arrays = [p.detach().numpy() for p in agent.state_dict().values()]
    arrays += [np.asarray(v) for s in state["state"].values() for v in s.values()]
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ppo_pbt as pb

    comm = MPI.COMM_WORLD
    assert comm.size == 3, "run on 3 ranks"
    torch.manual_seed(comm.rank)
    agent = pb.Agent(pb.make_envs("CartPole-v1", 1))
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3 * (comm.rank + 1), eps=1e-5)
    for _ in range(3):
        _, logprob, entropy, value = agent.get_action_and_value(torch.randn(8, 4))
        optimizer.zero_grad()
        (value.square().mean() - logprob.mean() - entropy.mean()).backward()
        optimizer.step()
    before = comm.allgather(digest(agent, optimizer))
    assert len(set(before)) == 3, "the members differ before any copy"

    for plan in ({1: 0, 2: 0}, {0: 2}):  # two copies of one parent; then a copy onto rank 0 from rank 2
        parents = comm.allgather(digest(agent, optimizer))
        state = {"model": agent.state_dict(), "optimizer": optimizer.state_dict(), "hyperparameters": {"x": comm.rank}}
        copied = pb.exchange(comm, plan, state)
        assert (copied is None) == (comm.rank not in plan)
        if copied is not None:
            assert copied["hyperparameters"] == {"x": plan[comm.rank]}
            agent.load_state_dict(copied["model"])
            optimizer.load_state_dict(copied["optimizer"])
        after = comm.allgather(digest(agent, optimizer))
        for member in range(comm.size):
            assert after[member] == parents[plan.get(member, member)], (plan, member)
    if comm.rank == 0:
        print("ok")


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
