"""UniAlignment at the paper's scale: the ~2.1B SD3-medium MMDiT of METHOD.md §1.

Model: 24 joint blocks, width 1536 (24 heads x 64), patch 2, 16 latent channels, T5-XXL context
(width 4096, 256 tokens), text head over 32100 tokens, sin-cos table 192 x 192 cropped to the grid,
alignment tap at block 8, adapters 1536 -> 2048 -> 3584 (Qwen2.5-VL-7B width). Training follows the
official `config_unify.py`: AdamW lr 3e-5, wd 0.01, 2000 warm-up steps, clip 2.0, global batch 384,
512 px.

Run (a TPU pod slice; every worker runs the same command):
  unialignment train --config experiments/unialignment_2b.py --workdir gs://BUCKET/runs/ua2b
Plan memory first (AOT compile on 8 simulated devices, nothing allocated):
  unialignment inspect --config experiments/unialignment_2b.py --compile --cpu_devices 8
"""

from unialignment_jax.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()  # the base schema carries the 2B model values (METHOD.md §1)
    c.input.resolution = 512
    c.input.text_length = 256
    c.batch_size = 384
    c.mesh.fsdp = -1
    c.sharding.rules = "fsdp"
    c.model.remat = "dots_no_batch"
    c.stages.main.steps = 80_000
    c.stages.main.warmup_steps = 2000
    c.checkpoint_every = 5000
    return c
