"""Cross-modal alignment: symmetric InfoNCE between pooled image and text features
(docs/method.md, "Contrastive alignment").

Official (`ContrastiveLoss` in train.py): `f_I = normalize(mean_tokens(image_hidden))` from the image
pass (final target tokens after the image head's AdaLN norm), `f_T = normalize(mean_tokens
(text_hidden))` from the text pass (final text tokens after the text head's LayerNorm, all positions
including padding), `S = f_I f_T^T / 0.07`, `L = (CE(S, arange) + CE(S^T, arange)) / 2`.

Negatives. The official code computes this per GPU micro-batch of 4 examples, without an
all-gather. Our default uses the whole batch the function is given: inside a GSPMD-jitted train
step the batch arrays are global (sharded over the data axes), so the B x B similarity over the
global batch is the natural computation and XLA inserts the all-gather of the pooled features
(B x D floats, small). `group_size=g` reproduces the official micro-batch mode: InfoNCE within
consecutive groups of g examples, averaged over the groups (a group never straddles a device
shard when the per-device batch is a multiple of g, so no gather is needed then).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TEMPERATURE = 0.07
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's eps


def l2_normalize(x: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
    """`x / max(|x|, eps)` along the last axis (torch `F.normalize`)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pooled_features(hidden: jax.Array) -> jax.Array:
    """(B, T, D) tokens -> (B, D) L2-normalised token mean; (B, D) input is only normalised."""
    if hidden.ndim == 3:
        hidden = jnp.mean(hidden.astype(jnp.float32), axis=1)
    elif hidden.ndim != 2:
        raise ValueError(f"features must be (B, T, D) tokens or (B, D) pooled, got shape {hidden.shape}")
    return l2_normalize(hidden)


def _symmetric_ce(img: jax.Array, txt: jax.Array, temperature: float):
    """img, txt (..., n, D) normalised -> per-group loss (...,) and top-1 image->text accuracy (...,)."""
    logits = jnp.einsum("...id,...jd->...ij", img, txt) / temperature
    n = logits.shape[-1]
    diag = jnp.diagonal(logits, axis1=-2, axis2=-1)
    i2t = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - diag, axis=-1)
    t2i = jnp.mean(jax.nn.logsumexp(logits, axis=-2) - diag, axis=-1)
    acc = jnp.mean((jnp.argmax(logits, axis=-1) == jnp.arange(n)).astype(jnp.float32), axis=-1)
    return 0.5 * (i2t + t2i), acc


def symmetric_info_nce(image_features: jax.Array, text_features: jax.Array, *,
                       temperature: float = TEMPERATURE,
                       group_size: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE between image features and text features of the same B examples.

    Args:
      image_features: (B, T, D) image-pass tokens (`image_hidden`), or (B, D) already pooled.
      text_features: (B, L, D) text-pass tokens (`text_hidden`), or (B, D) already pooled.
      temperature: fixed temperature (official 0.07).
      group_size: None = negatives from the whole (global) batch; g = official micro-batch mode,
        InfoNCE within consecutive groups of g, averaged over the B / g groups.

    Returns (scalar, {"accuracy": image->text top-1 accuracy}).
    """
    img, txt = pooled_features(image_features), pooled_features(text_features)
    if img.shape != txt.shape:
        raise ValueError(f"pooled image features {img.shape} and text features {txt.shape} differ")
    b = img.shape[0]
    if group_size is not None:
        if group_size < 1 or b % group_size:
            raise ValueError(f"contrastive group_size {group_size} does not divide the batch {b}")
        img = img.reshape(b // group_size, group_size, -1)
        txt = txt.reshape(b // group_size, group_size, -1)
    loss, acc = _symmetric_ce(img, txt, temperature)
    return jnp.mean(loss), {"accuracy": jax.lax.stop_gradient(jnp.mean(acc))}
