"""Test setup: 8 simulated CPU devices, configured before jax is imported
(docs/scaling.md, "Simulated devices").

The environment (cli.simulated_device_env) avoids XLA:CPU's in-process collective deadlocks on meshes with two or
more non-trivial axes; multi-step loops must also block on each step's outputs (docs/scaling.md).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from unialignment_jax.cli import simulated_device_env  # noqa: E402  (imports no jax)

os.environ.update(simulated_device_env(8))
# One XLA compilation cache for the session, shared with the CLI subprocesses the tests start:
# repeated compiles of the same tiny train step (resume tests) are then read back, not redone.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    __import__("tempfile").gettempdir(), "unialignment_jax_test_xla_cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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


@pytest.fixture
def bucket():
    """gs:// served from memory (tests/fake_bucket.py) for the test: yields "gs://test-bucket"."""
    from fake_bucket import registered

    with registered() as uri:
        yield uri
