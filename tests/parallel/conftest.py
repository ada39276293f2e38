import datetime

import pytest
import torch.distributed as dist

from moesys.parallel.simulate import free_port


@pytest.fixture
def world1(monkeypatch):
    """A one-rank gloo process group in this process."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()
