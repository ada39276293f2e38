"""A user's script run by launchers/simulate_ep.sh in test_loopback.py: join the group, build the
mesh's groups, one collective; write this rank's and its launcher's listening sockets (read while
every rank is up) to <out>/rank<r>.json. Exits with code 3 on rank `fail_rank` when given."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sockets  # noqa: E402

from moesys.parallel import ParallelDims  # noqa: E402


def main(out: str, fail_rank: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == fail_rank:
        sys.exit(3)
    dims = ParallelDims.build(ep=dist.get_world_size(), tp=1)
    t = torch.ones(1)
    dist.all_reduce(t, group=dims.ep_group)
    seen = sockets.listening_of([os.getpid(), os.getppid()])
    dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": seen.get(os.getpid(), []), "launcher": seen.get(os.getppid(), []), "sum": float(t)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else -1)
