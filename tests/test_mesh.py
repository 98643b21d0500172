"""Meshes from config: axis filling, errors, hybrid ICI x DCN layouts, distributed start-up gating."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from unialignment_jax.parallel import mesh as mesh_lib


def cfg(**kw):
    base = dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1, dcn_granule="slice")
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_fill_and_shapes():
    m = mesh_lib.make_mesh(cfg(data=2, fsdp=-1, tensor=2))
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert m.axis_names == ("data", "fsdp", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    assert dict(mesh_lib.make_mesh(cfg(data=-1, fsdp=1, tensor=1)).shape)["data"] == 8


@pytest.mark.parametrize("kw, message", [
    (dict(data=-1, fsdp=-1), "at most one axis"),
    (dict(data=3, fsdp=-1), "cannot fill 8 devices"),
    (dict(data=2, fsdp=2, tensor=1), "4 devices, but 8 are available"),
    (dict(data=0), "positive or -1"),
    (dict(dcn_data=3), "granules do not divide"),
])
def test_errors(kw, message):
    with pytest.raises(mesh_lib.MeshConfigError, match=message):
        mesh_lib.make_mesh(cfg(**kw))


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_hybrid_mesh_keeps_slices_together():
    # 2 slices x 4 devices; DCN carries `data` (2), ICI carries fsdp=2 x tensor=2.
    devices = [FakeDevice(i, slice_index=i // 4, process_index=i // 4) for i in range(8)]
    grid = mesh_lib.device_grid(cfg(data=1, fsdp=2, tensor=2, dcn_data=2), devices)
    assert grid.shape == (2, 2, 2)
    for d in range(2):  # each data replica is one whole slice
        assert {dev.slice_index for dev in grid[d].ravel()} == {d}
    # GPU-style: hosts are the granules.
    grid = mesh_lib.device_grid(cfg(data=1, fsdp=4, tensor=1, dcn_fsdp=2, dcn_granule="process"), devices)
    assert grid.shape == (1, 8, 1)
    assert [dev.process_index for dev in grid.ravel()] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_distributed_initialize_is_gated(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    dist = ml_collections.ConfigDict(dict(mode="auto", coordinator_address="", num_processes=1, process_id=0,
                                          local_device_ids=""))
    mesh_lib.initialize_distributed(dist)
    assert calls == []  # single process: nothing to do
    dist.coordinator_address, dist.num_processes, dist.process_id = "10.0.0.1:1234", 4, 2
    mesh_lib.initialize_distributed(dist)
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)]
    dist.mode = "off"
    mesh_lib.initialize_distributed(dist)
    assert len(calls) == 1
