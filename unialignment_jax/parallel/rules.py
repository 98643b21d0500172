"""Logical-axis rules: the one table that maps logical tensor axes onto mesh axes.

Every parameter and every large activation in the project names its axes with the logical names
below. A *preset* maps each logical name to a mesh axis (or a tuple of them, or None = replicated).
Changing the parallelism of a run is choosing another preset (`config.sharding.rules`), never
editing a model.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel + parameter sharding, ZeRO-3 style),
`tensor` (Megatron-style tensor parallel over heads / MLP / vocabulary).

Logical parameter axes:
  layers       the stacked-layer axis of scanned blocks (never sharded, see flax issue 5112)
  embed        the model width (1536 at 2B)
  heads, kv    attention heads and head dim; qkv is the fused q/k/v axis of size 3
  mlp          the feed-forward hidden width
  modulation   the AdaLN modulation outputs (6 x width); a third of the DiT's parameters
  vocab        the text-head vocabulary
  context_in   the text-encoder width fed to the context embedder (4096 for T5-XXL)
  patch        flattened patch pixels (p * p * channels)
  time_freq    the sinusoidal timestep features
  adapter_mlp, teacher  the alignment adapters' hidden and output widths
  null_tokens  the learned null-image tokens
Logical activation axes: act_batch, act_length, act_embed, act_heads, act_mlp, act_vocab.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import PartitionSpec

BATCH_AXES = ("data", "fsdp")

LOGICAL_AXES = (
    "layers", "embed", "heads", "kv", "qkv", "mlp", "modulation", "vocab", "context_in",
    "time_freq", "adapter_mlp", "teacher", "null_tokens",
    "act_batch", "act_length", "act_embed", "act_heads", "act_mlp", "act_vocab",
)

_REPLICATED = {name: None for name in LOGICAL_AXES}

PRESETS: dict[str, dict[str, object]] = {
    # Pure data parallel: parameters replicated, batch split over every data-like axis.
    "dp": {**_REPLICATED, "act_batch": BATCH_AXES},
    # FSDP (ZeRO-3): every matrix sharded along the model width over `fsdp`; the all-gather of
    # a block's weights happens inside the layer scan, one block at a time.
    "fsdp": {**_REPLICATED, "embed": "fsdp", "act_batch": BATCH_AXES},
    # FSDP + tensor parallel: the other matrix dimension (heads, MLP, modulation, vocabulary)
    # split over `tensor`, activations split the same way inside attention and the MLP.
    "fsdp_tp": {
        **_REPLICATED,
        "embed": "fsdp",
        "heads": "tensor",
        "mlp": "tensor",
        "modulation": "tensor",
        "vocab": "tensor",
        "adapter_mlp": "tensor",
        "act_batch": BATCH_AXES,
        "act_heads": "tensor",
        "act_mlp": "tensor",
        "act_vocab": "tensor",
    },
}


def get_rules(preset: str) -> tuple[tuple[str, object], ...]:
    """The rules of a preset as the (logical, mesh) pairs that `nnx.logical_axis_rules` takes."""
    if preset not in PRESETS:
        raise ValueError(f"config.sharding.rules: unknown preset {preset!r}; known: {sorted(PRESETS)}")
    return tuple(PRESETS[preset].items())


def logical_to_spec(names: Sequence[str | None], rules) -> PartitionSpec:
    """PartitionSpec for a tuple of logical names; an unknown name is an error, never a mesh axis."""
    table = dict(rules)
    out = []
    for name in names:
        if name is None:
            out.append(None)
        elif name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; add it to parallel/rules.py")
        else:
            out.append(table[name])
    return PartitionSpec(*out)


def current_rules():
    from flax.core import spmd  # local import: keeps this module importable without flax state

    return spmd.get_logical_axis_rules()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names, under the active mesh and rules; a no-op without them.

    Used on the big activations (the residual streams, attention heads, MLP hidden) so that
    GSPMD keeps the layout the preset intends instead of guessing.
    """
    rules = current_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))
