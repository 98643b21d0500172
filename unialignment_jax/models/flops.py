"""Analytic FLOPs of the DiT (and the frozen text encoder), for MFU and `inspect`.

The formula (documented in docs/performance.md, "MFU"): count 2 FLOPs per multiply-add of every matmul, including
attention's QK^T and PV over the full non-causal joint sequence; ignore elementwise work (norms,
activations, softmax), which is a few percent. A training pass costs 3x its forward (backward =
2x forward) with no remat; recomputation under remat is *not* counted, so MFU stays comparable
across remat policies (the convention of PaLM's MFU). Frozen encoders run forward only.
"""

from __future__ import annotations

from unialignment_jax.models.mmdit import DiTConfig


def block_forward_flops(cfg: DiTConfig, n_img: int, n_txt: int) -> int:
    """One joint block, one example: both streams' projections, MLPs, modulation and attention."""
    d = cfg.width
    per_token = 2 * (3 * d * d + d * d + 2 * cfg.mlp_ratio * d * d)  # qkv, out, mlp in + out
    modulation = 2 * 2 * d * 6 * d  # two streams, per example
    n = n_img + n_txt
    attention = 2 * 2 * n * n * d  # QK^T and PV over all heads
    return per_token * n + modulation + attention


def dit_forward_flops(cfg: DiTConfig, n_target: int, n_cond: int, n_txt: int, tap: bool = True) -> int:
    """Forward FLOPs of one example: embeddings, all blocks, both heads (and the adapters)."""
    d, p = cfg.width, cfg.patch_size
    embed = 2 * (n_target + n_cond) * p * p * cfg.in_channels * d + 2 * n_txt * cfg.context_dim * d
    time = 2 * (cfg.timestep_dim * d + d * d)
    blocks = cfg.num_layers * block_forward_flops(cfg, n_target + n_cond, n_txt)
    image_head = 2 * d * 2 * d + 2 * n_target * d * p * p * cfg.out_channels
    text_head = 2 * n_txt * d * cfg.vocab_size
    adapters = 2 * 2 * (d * cfg.adapter_hidden + cfg.adapter_hidden * cfg.adapter_out) if tap else 0
    return embed + time + blocks + image_head + text_head + adapters


def t5_forward_flops(d_model: int, num_layers: int, num_heads: int, d_kv: int, d_ff: int, length: int) -> int:
    """T5 v1.1 encoder forward FLOPs for one sequence (gated FF: two input matrices)."""
    inner = num_heads * d_kv
    per_token = 2 * (4 * d_model * inner + 3 * d_model * d_ff)
    attention = 2 * 2 * length * length * inner
    return num_layers * (per_token * length + attention)


def train_pass_flops(forward: int) -> int:
    """Forward + backward of a trained pass (backward = 2x forward)."""
    return 3 * forward


def step_flops(config, task: str, batch: int, resolution: int | None = None) -> int:
    """Analytic FLOPs of one training step of `task` (both passes, the frozen text encoder on the
    prompt and on the masked caption) at global batch `batch`; `config` is an experiment config."""
    from unialignment_jax import tasks as tasks_lib

    cfg = DiTConfig.from_config(config.model)
    te = config.text_encoder
    side = (resolution or config.input.resolution) // config.input.latent_downsample // cfg.patch_size
    n_target, n_txt = side * side, config.input.text_length
    n_cond = tasks_lib.num_conditions(task, config.input.num_compose_refs) * n_target
    t5 = t5_forward_flops(te.d_model, te.num_layers, te.num_heads, te.d_kv, te.d_ff, n_txt)
    total = train_pass_flops(dit_forward_flops(cfg, n_target, 0, n_txt)) + t5  # text pass
    if task in tasks_lib.IMAGE_PASS_TASKS:
        total += train_pass_flops(dit_forward_flops(cfg, n_target, n_cond, n_txt)) + t5
    return batch * total
