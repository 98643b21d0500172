"""Creating models already sharded: abstract shapes first, then one jitted init with out_shardings.

Nothing is ever materialised on one device and resharded: a 2B model (or T5-XXL) would not fit.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unialignment_jax.parallel import rules as rules_lib


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules):
    """The mesh and logical rules every model creation and step trace runs under."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def build_local(make: Callable[[], nnx.Module]) -> nnx.Module:
    """Build a model on the default device, without a mesh (tests, conversion tools).

    Our parameters carry logical sharding names; with flax's eager sharding on, creating them needs
    a mesh. Here it is switched off: placement comes from `create_sharded`'s out_shardings instead.
    """
    with nnx.use_eager_sharding(False):
        return make()


def divisible(shape: tuple, sharding: NamedSharding) -> NamedSharding:
    """The sharding with every dimension that its mesh axes do not divide left unsplit.

    Parameters must split evenly to be placed or restored (e.g. a 175-row vocabulary on tensor = 2,
    or the official 32100-row text head on tensor = 8); such a dimension is replicated instead
    (the other dimensions keep their axes) rather than failing the run.
    """
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    sizes = dict(sharding.mesh.shape)
    for i, axes in enumerate(spec):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        if shape[i] % math.prod(sizes[a] for a in names):
            spec[i] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)


def abstract_state(make: Callable[[], nnx.Module], mesh: Mesh, rules):
    """(graphdef, State of ShapeDtypeStructs carrying the NamedShardings the rules give; a dimension
    the mesh does not divide is replicated: `divisible`)."""
    with sharding_context(mesh, rules), nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(make))
        shardings = nnx.get_named_sharding(state, mesh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=divisible(s.shape, sh)),
                            state, shardings)
    return graphdef, abstract


def create_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules) -> nnx.Module:
    """Build `make()` directly into its shardings (a jitted init with `out_shardings`)."""
    graphdef, abstract = abstract_state(make, mesh, rules)
    shardings = jax.tree.map(lambda s: s.sharding, abstract)
    with sharding_context(mesh, rules), nnx.use_eager_sharding(False):
        # Placement comes from out_shardings alone (no per-variable constraints inside the init).
        state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


__all__ = ["abstract_state", "create_sharded", "divisible", "sharding_context", "rules_lib"]
