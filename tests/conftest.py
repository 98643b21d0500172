"""Test setup: 8 simulated CPU devices, configured before jax is imported (STACK.md).

The scheduler flag avoids XLA:CPU's in-process collective deadlock on meshes with two or more
non-trivial axes; multi-step loops must also block on each step's outputs (see STACK.md).
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


def make_mesh(data=1, fsdp=-1, tensor=1):
    from unialignment_jax.parallel import mesh as mesh_lib

    return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


@pytest.fixture(scope="session")
def mesh_222():
    return make_mesh(2, 2, 2)
