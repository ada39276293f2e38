"""Rank bodies for test_rank_pool.py (module-level: the pool's ranks unpickle them by name)."""
import os
import time

import torch
import torch.distributed as dist


def identity_worker(tag):
    """This rank's pid, rank, world size, an all-reduced sum, and what an earlier run may have left."""
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    leftover = dict(env=os.environ.get("POOL_TEST_LEFTOVER"), dtype=str(torch.get_default_dtype()),
                    groups=dist.distributed_c10d._world.group_count)
    os.environ["POOL_TEST_LEFTOVER"] = tag  # a body's leftovers must not reach the next run
    torch.set_default_dtype(torch.float64)
    dist.new_group([0, 1])
    return dict(pid=os.getpid(), rank=dist.get_rank(), world=dist.get_world_size(), sum=float(t), leftover=leftover,
                local=(os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]))


def failing_worker():
    """Rank 1 raises; rank 0 waits in a collective rank 1 never joins (both first past the
    rendezvous, so rank 0's side is always inside this function)."""
    dist.barrier()
    if dist.get_rank() == 1:
        raise ValueError("pool body fails on purpose")
    dist.barrier()
    return "unreachable"


def hanging_worker():
    """Every rank sleeps past the run's limit in a function whose name the stacks must show."""
    def sleeping_in_the_body():
        time.sleep(60)
    sleeping_in_the_body()
    return "unreachable"


def dying_worker():
    """Rank 0 leaves without a word (as a segfault would)."""
    dist.barrier()
    if dist.get_rank() == 0:
        os._exit(3)
    dist.barrier()
    return "unreachable"
