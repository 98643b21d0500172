"""The embedded default: a tiny UniAlignment that trains on the CPU in minutes.

Same architecture as experiments/unialignment_2b.py at toy scale: 4 joint blocks of width 128,
32 x 32 pixel images through the exact pixel codec (space-to-depth by 4 -> 8 x 8 x 48 "latents",
patch 2 -> 16 image tokens), a 32-token text context, and a small vocabulary.

Run (8 simulated CPU devices, data x fsdp mesh):
  unialignment train --config experiments/demo.py --workdir /tmp/ua_demo --cpu_devices 8
Variants: `experiments/demo.py:tiny` (2 blocks, for tests).
"""

from unialignment_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.log_every = 10
    c.checkpoint_every = 100
    c.model.update(dict(
        num_layers=4,
        num_heads=4,
        head_dim=32,
        patch_size=2,
        in_channels=48,
        out_channels=48,
        sample_size=8,
        pos_embed_max_size=12,
        context_dim=64,
        vocab_size=384,
        num_null_tokens=8,
        block_depth=2,
        adapter_hidden=128,
        adapter_out=64,
        timestep_dim=64,
    ))
    c.input.update(dict(resolution=32, latent_downsample=4, text_length=32, num_compose_refs=3))
    c.mesh.update(dict(data=2, fsdp=-1, tensor=1))
    c.batch_size = 16
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 1.0
    c.stages.main.steps = 300
    c.stages.main.warmup_steps = 20
    if arg == "tiny":
        c.model.num_layers = 2
        c.model.block_depth = 1
        c.stages.main.steps = 20
    elif arg:
        raise ValueError(f"experiments/demo.py: unknown variant {arg!r} (known: tiny)")
    return c
