"""unialignment_jax: train UniAlignment (one MMDiT for generation, editing, perception and
understanding) with JAX and Flax NNX, from a CPU demo to TPU pods. See README.md and WORKSPACE.md."""

__version__ = "0.1.0"
