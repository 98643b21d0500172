"""The device mesh from config: axes (data, fsdp, tensor), one of them may be -1 (fill).

Single slice / single node: the mesh is `mesh.{data,fsdp,tensor}` over all devices.

Multi-slice TPU pods and multi-node GPU clusters: the fast network (ICI / NVLink) carries the
axes `mesh.{data,fsdp,tensor}` inside one *granule* (a TPU slice, or a host for GPUs) and the slow
network (DCN / InfiniBand) carries `mesh.dcn_{data,fsdp,tensor}` across granules. The mesh axis
`data` then has size data * dcn_data, and so on. Usually only `dcn_data` (or `dcn_fsdp`) is > 1:
only the gradient all-reduce should cross DCN.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


class MeshConfigError(ValueError):
    pass


def fill_axes(sizes: dict[str, int], n: int, prefix: str = "mesh.") -> dict[str, int]:
    """Replace one -1 by whatever makes the product equal `n`; check the product otherwise."""
    fills = [k for k, v in sizes.items() if v == -1]
    bad = [k for k, v in sizes.items() if v != -1 and v < 1]
    if bad:
        raise MeshConfigError(f"{prefix}{bad[0]} = {sizes[bad[0]]}: axis sizes are positive or -1")
    if len(fills) > 1:
        raise MeshConfigError(f"{prefix}{{{','.join(fills)}}}: at most one axis may be -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    out = dict(sizes)
    if fills:
        if n % known:
            raise MeshConfigError(
                f"{prefix}{fills[0]} = -1 cannot fill {n} devices: the other axes multiply to {known}"
            )
        out[fills[0]] = n // known
    elif known != n:
        shape = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise MeshConfigError(f"{prefix}: {shape} = {known} devices, but {n} are available")
    return out


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[dict[str, int], dict[str, int]]:
    """(ici sizes, dcn sizes) per axis for `n_devices` devices, with -1 filled in."""
    dcn = {a: int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES}
    for a, v in dcn.items():
        if v < 1:
            raise MeshConfigError(f"mesh.dcn_{a} = {v}: DCN axis sizes are explicit positive integers")
    n_granules = math.prod(dcn.values())
    if n_devices % n_granules:
        raise MeshConfigError(f"mesh.dcn_*: {n_granules} granules do not divide {n_devices} devices")
    ici = fill_axes({a: int(mesh_cfg[a]) for a in MESH_AXES}, n_devices // n_granules)
    return ici, dcn


def device_grid(mesh_cfg, devices: Sequence[Any]) -> np.ndarray:
    """The devices arranged as the (data, fsdp, tensor) grid the config asks for."""
    ici, dcn = mesh_shape(mesh_cfg, len(devices))
    ici_shape = [ici[a] for a in MESH_AXES]
    dcn_shape = [dcn[a] for a in MESH_AXES]
    if math.prod(dcn_shape) == 1:
        # allow_split_physical_axes: a logical axis may span part of a physical torus axis
        # (e.g. tensor=2 on a 4-wide ring) instead of failing.
        return mesh_utils.create_device_mesh(ici_shape, list(devices), allow_split_physical_axes=True)
    granule = mesh_cfg.get("dcn_granule", "slice")
    if granule not in ("slice", "process"):
        raise MeshConfigError(f"mesh.dcn_granule = {granule!r}: use 'slice' (TPU) or 'process' (GPU hosts)")
    return mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, list(devices), process_is_granule=(granule == "process"),
        allow_split_physical_axes=True,
    )


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with Auto axis types (GSPMD-style steps; `jax.make_mesh`'s default
    Explicit axes fail them with "Contracting dimensions are sharded")."""
    devices = jax.devices() if devices is None else devices
    grid = device_grid(mesh_cfg, devices)
    mesh = Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    logging.info("mesh %s over %d devices", dict(mesh.shape), grid.size)
    return mesh


def initialize_distributed(dist_cfg) -> None:
    """Multi-host start-up. Call before anything touches devices.

    `dist_cfg.mode`: 'auto' initializes when the environment describes a multi-process job (TPU pod
    slices, Slurm, or explicit coordinator variables); 'on' always initializes (jax then auto-detects
    the cluster, or uses the explicit fields); 'off' never does.
    """
    import os

    mode = dist_cfg.get("mode", "auto")
    if mode == "off":
        return
    explicit = bool(dist_cfg.get("coordinator_address"))
    env_multi = any(
        os.environ.get(k)
        for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
    )
    if mode == "auto" and not (explicit or env_multi):
        return
    if os.environ.get("SLURM_NTASKS") == "1" and not explicit and mode == "auto":
        return
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=dist_cfg.coordinator_address,
            num_processes=int(dist_cfg.num_processes),
            process_id=int(dist_cfg.process_id),
        )
        if dist_cfg.get("local_device_ids"):
            kwargs["local_device_ids"] = [int(i) for i in str(dist_cfg.local_device_ids).split(",")]
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
