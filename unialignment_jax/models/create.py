"""Creating models already sharded: abstract shapes first, then one jitted init with out_shardings.

Nothing is ever materialised on one device and resharded: a 2B model (or T5-XXL) would not fit.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh

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


def abstract_state(make: Callable[[], nnx.Module], mesh: Mesh, rules):
    """(graphdef, State of ShapeDtypeStructs carrying the NamedShardings the rules give)."""
    with sharding_context(mesh, rules), nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(make))
        shardings = nnx.get_named_sharding(state, mesh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)
    return graphdef, abstract


def create_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules) -> nnx.Module:
    """Build `make()` directly into its shardings (a jitted init with `out_shardings`)."""
    graphdef, abstract = abstract_state(make, mesh, rules)
    shardings = jax.tree.map(lambda s: s.sharding, abstract)
    with sharding_context(mesh, rules), nnx.use_eager_sharding(False):
        # Placement comes from out_shardings alone (no per-variable constraints inside the init).
        state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def param_count(state) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))


__all__ = ["abstract_state", "create_sharded", "param_count", "sharding_context", "rules_lib"]
