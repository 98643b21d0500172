"""The medium CPU benchmark config (STACK.md / issue 9 targets): width 384 (6 heads x 64), 8 joint
blocks, 256 image tokens (32 x 32 latents, patch 2) + 64 text tokens, batch 8, float32, one device.

Run:
  unialignment bench --config experiments/bench_medium.py --compile_compare
"""

from unialignment_jax.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.update(dict(num_layers=8, num_heads=6, head_dim=64, block_depth=4, remat="none", dtype="float32"))
    c.input.update(dict(resolution=256, latent_downsample=8, text_length=64))
    c.batch_size = 8
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.sharding.rules = "dp"
    return c
