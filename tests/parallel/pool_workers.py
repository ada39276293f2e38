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


_KEPT = []  # what leaking_worker keeps alive across runs


def leaking_worker():
    """A body that keeps its group referenced past destroy_process_group (as a library's cache can):
    this rank's pid and how many gloo loop threads the process has now."""
    _KEPT.append(dist.new_group([0, 1]))
    t = torch.ones(1)
    dist.all_reduce(t, group=_KEPT[-1])
    task = f"/proc/{os.getpid()}/task"
    loops = 0
    for tid in os.listdir(task):
        with open(f"{task}/{tid}/comm") as f:
            loops += f.read().strip() == "gloo_tcp_loop"
    return os.getpid(), loops


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


def dtensor_norm_worker(extra_groups):
    """The global norm of two Shard(0) DTensors (clip_grad_norm_'s path) over a mesh whose group is
    made after `extra_groups` others, so its registered name differs from run to run."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    for _ in range(extra_groups):
        dist.new_group([0, 1])
    mesh = DeviceMesh.from_group(dist.new_group([0, 1]), "cpu")
    full = [torch.arange(8.0), torch.arange(4.0) - 2.0]
    parts = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    norm = torch.nn.utils.get_total_norm(parts)
    return float(norm.full_tensor()), float(torch.nn.utils.get_total_norm(full))
