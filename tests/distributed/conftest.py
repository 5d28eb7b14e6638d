"""The process group of one rank in the test process, for the tests of ``distributed=``
that need no peers (tests/distributed/test_distributed_single_rank.py,
tests/distributed/test_lbfgs_sharded.py)."""

import pytest
import torch.distributed as dist

from dist_harness import rendezvous


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    init_method = rendezvous(str(tmp_path_factory.mktemp("rendezvous")))
    dist.init_process_group("gloo", init_method=init_method, rank=0, world_size=1)
    yield
    dist.destroy_process_group()
