"""The medium CPU benchmark config (issue 9's targets; docs/performance.md): width 384 (6 heads x 64), 8 joint
blocks, 256 image tokens (32 x 32 latents, patch 2) + 64 text tokens, batch 8, float32, one device.

The frozen text encoder is a stand-in (one T5 layer of width 4096 = model.context_dim, float32):
T5-XXL does not fit a CPU benchmark, and the DiT's step is what is measured. The tokenizer file is
not needed: `bench` feeds random token ids in the T5 layout (vocabulary 32100, mask 32099).

The variant is the remat policy (default "dots_except_scores", models/layers.py): every matmul
output but the attention scores is saved, the elementwise work between matmuls is recomputed in
the backward pass. The scan no longer writes every norm, GELU and modulation intermediate of every
layer to memory and reads it back, which is what an XLA:CPU step spends its non-matmul time on
(1.3-2x faster steps than "none" here, docs/performance.md), and QK^T (b*h*T^2 floats, 2 * head_dim FLOPs each)
is recomputed rather than stored (1.04-1.06x faster than "dots"; the MFU count is unchanged).
`experiments/bench_medium.py:none` is the unrematted step, `:dots` keeps the scores too.

Run (one plain CPU device, the CPU flag preset of launch/local.sh):
  UNIALIGNMENT_CPU_DEVICES=0 bash launch/local.sh bench --config experiments/bench_medium.py --compile_compare
  python benchmarks/torch_reference_step.py      # the same model and objective in PyTorch, ratio
  python benchmarks/torch_reference_step.py --config experiments/bench_medium.py:none
"""

from unialignment_jax.config import base_config


def get_config(arg=None):
    remat = arg or "dots_except_scores"  # validated by config.validate (model.remat)
    c = base_config()
    c.model.update(dict(num_layers=8, num_heads=6, head_dim=64, block_depth=4, remat=remat, dtype="float32"))
    c.input.update(dict(resolution=256, latent_downsample=8, text_length=64))
    c.batch_size = 8
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.sharding.rules = "dp"
    c.text_encoder.update(dict(preset="custom", d_model=4096, num_layers=1, num_heads=1, d_kv=64, d_ff=64,
                               dtype="float32", param_dtype="float32"))
    return c
