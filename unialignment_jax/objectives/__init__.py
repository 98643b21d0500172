"""UniAlignment objectives: pure loss functions of arrays, and the dual-stream objective.

  flow_matching   image flow matching (logit-normal sigma on the 1/1000 grid, x0-reconstruction MSE,
                  CFG dropout)
  text_diffusion  MDLM masked text diffusion (log-linear, antithetic t, SUBS, weight 1/t)
  contrastive     symmetric InfoNCE between pooled final image and text features
  alignment       1 - cosine between the adapters' outputs and frozen teacher features
  unified         `dual_stream_loss`: the two model passes of one task batch and the weighted total
"""

from unialignment_jax.objectives.unified import (  # noqa: F401
    TERMS,
    LossWeights,
    ObjectiveOptions,
    Plan,
    draw_randomness,
    dual_stream_loss,
    make_plan,
)
