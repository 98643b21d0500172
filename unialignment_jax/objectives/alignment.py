"""Intrinsic-modal alignment (REPA-like, pooled; docs/method.md "Intrinsic alignment").

The adapters' outputs at the `block_depth` tap (`tap_image` from the image pass, `tap_text` from
the text pass) are pulled towards frozen teacher features supplied with the batch (official:
Qwen2.5-VL-7B pooled ViT-merger features of the target image, and pooled LLM input embeddings of
the caption): `L = 1 - mean_b cos(g_b, y_b)`, both sides L2-normalised as torch `F.normalize`
(the official `cosine_similarity_loss`). The teacher receives no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unialignment_jax.objectives.contrastive import l2_normalize


def cosine_alignment_loss(student: jax.Array, teacher: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """student, teacher (B, D) -> (1 - mean_b cos, {"cosine": mean cosine})."""
    if student.shape != teacher.shape:
        raise ValueError(f"adapter output {student.shape} and teacher features {teacher.shape} differ; "
                         "model.adapter_out must equal the teacher width")
    cos = jnp.sum(l2_normalize(student) * l2_normalize(jax.lax.stop_gradient(teacher)), axis=-1)
    mean_cos = jnp.mean(cos)
    return 1.0 - mean_cos, {"cosine": jax.lax.stop_gradient(mean_cos)}
