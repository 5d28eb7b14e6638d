"""pytest options and fixtures of the kernel microbenchmarks (``pytest bench/ --benchmark-only``).

``--bench-smoke`` runs every benchmark at tiny sizes (with ``--benchmark-disable``
it is what ``make test`` runs); ``--bench-max-n`` caps N (default 1e7 on the
CPU, 1e8 on CUDA).
"""

from __future__ import annotations

import pytest
import torch

from bench.machine import default_device, machine_stamp
from bench.timing import copy_bandwidth


def pytest_addoption(parser):
    group = parser.getgroup("mlbfgs bench")
    group.addoption("--bench-smoke", action="store_true", help="tiny sizes: check that every benchmark runs")
    group.addoption("--bench-max-n", type=float, default=None, help="largest N (default 1e7 CPU, 1e8 CUDA)")
    group.addoption("--bench-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def pytest_configure(config):
    threads = config.getoption("--bench-threads")
    if threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device():
    return default_device()


@pytest.fixture(scope="session")
def smoke(request):
    return request.config.getoption("--bench-smoke")


@pytest.fixture(scope="session")
def bandwidth(device, smoke):
    """The machine's copy bandwidth (bytes read + written per second), measured in this run."""
    if smoke:
        return copy_bandwidth(device, nbytes=1 << 20, repeats=2)
    return copy_bandwidth(device)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["mlbfgs_machine"] = machine_stamp()
