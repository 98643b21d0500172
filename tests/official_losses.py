"""Our own PyTorch (float32) transcription of the official UniAlignment loss formulas.

Sources, repository glimmer16/UniAlignment: `modules/loss_utils.py` (ImageFlowMatchingLoss[_edit],
LogLinearNoise, TextMaskedDiffusionLoss), `train.py` (ContrastiveLoss, cosine_similarity_loss, the
loss combination) and `configs/config_unify.py` (eps, antithetic sampling, weights). Written for the
tests, not copied: the random draws the official code makes internally (torch.normal, torch.rand)
are arguments here, so both implementations can be fed the same noise, sigma, t and masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_INDEX = 32099
NEG_INFINITY = -1000000.0
WEIGHTS = dict(image=1.0, text=0.2, contrastive=0.05, align_image=0.1, align_text=0.1)


# ------------------------------------------------------------------------- image flow matching


def flow_sigmas_and_timesteps(u: torch.Tensor):
    """The official timestep draw given u = sigmoid(N(0,1)): index the default scheduler's table,
    then look the sigma up by timestep (the official `get_sigmas`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()  # shift 1, 1000 training steps
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    table_t, table_sigma = scheduler.timesteps, scheduler.sigmas
    step = [int((table_t == t).nonzero().item()) for t in timesteps]
    return table_sigma[step].flatten().to(torch.float32), timesteps.to(torch.float32)


def flow_noisy_input(x0, noise, sigmas):
    s = sigmas.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise


def flow_loss(model_pred, x0, noise, sigmas):
    """x0-reconstruction MSE with unit weighting, mean over each sample, then over the batch."""
    s = sigmas.reshape(-1, *([1] * (x0.ndim - 1)))
    noisy = flow_noisy_input(x0, noise, sigmas)
    pred = model_pred * (-s) + noisy
    weighting = torch.ones_like(s)  # compute_loss_weighting_for_sd3('logit_normal')
    per_sample = torch.mean((weighting.float() * (pred.float() - x0.float()) ** 2).reshape(x0.shape[0], -1), 1)
    return per_sample.mean()


def cfg_dropout(text_emb, null_embeds, drop_u, p=0.1):
    dropout_idx = drop_u < p
    return torch.where(dropout_idx[:, None, None], null_embeds, text_emb)


# ----------------------------------------------------------------------- masked text diffusion


class LogLinear:
    def __init__(self, eps=1e-3):
        self.eps = eps

    def total_noise(self, t):
        return -torch.log1p(-(1 - self.eps) * t)

    def rate_noise(self, t):
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def __call__(self, t):
        return self.total_noise(t), self.rate_noise(t)


def antithetic_t(rand_n: torch.Tensor, sampling_eps=1e-3):
    """`_sample_t` with antithetic sampling on and importance sampling off; rand_n = torch.rand(n)."""
    n = rand_n.shape[0]
    offset = torch.arange(n, dtype=torch.float32) / n
    eps_t = (rand_n / n + offset) % 1
    return (1 - sampling_eps) * eps_t + sampling_eps


def q_xt(x0, t, rand_bl, mask_index=MASK_INDEX, cond_mask=None):
    """Masking given the uniform draws rand_bl = torch.rand(B, L); cond_mask (1 = may be masked)."""
    sigma, _ = LogLinear()(t)
    move_chance = 1 - torch.exp(-sigma[:, None])
    xt = torch.where(rand_bl < move_chance, mask_index, x0)
    if cond_mask is not None:
        xt = x0 * (1 - cond_mask) + cond_mask * xt
    return xt


def subs(logits, xt, mask_index=MASK_INDEX):
    logits = logits.clone()
    logits[:, :, mask_index] += NEG_INFINITY
    logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    unmasked = xt != mask_index
    logits[unmasked] = NEG_INFINITY
    logits[unmasked, xt[unmasked]] = 0
    return logits


def text_loss(logits, x0, xt, t, label_mask=None, attention_mask=None, ignore_padding=False,
              mask_index=MASK_INDEX):
    sigma, dsigma = LogLinear()(t)
    logp = subs(logits, xt, mask_index)
    log_p_theta = torch.gather(logp, -1, x0[:, :, None]).squeeze(-1)
    loss = -log_p_theta * (dsigma / torch.expm1(sigma))[:, None]
    if label_mask is not None:
        loss = loss * label_mask
    if ignore_padding:
        nlls = loss * attention_mask
        count = attention_mask.sum()
    else:
        nlls = loss
        count = x0.shape[0] * x0.shape[1]
    return nlls.sum() / count


# ------------------------------------------------------------------ contrastive and alignment


def contrastive(hidden_states, encoder_hidden_states, temperature=0.07):
    img = F.normalize(hidden_states.mean(dim=1), dim=-1)
    txt = F.normalize(encoder_hidden_states.mean(dim=1), dim=-1)
    logits = img @ txt.T / temperature
    labels = torch.arange(logits.size(0))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def contrastive_micro_batches(hidden_states, encoder_hidden_states, micro_batch=4):
    """The official per-micro-batch computation, averaged over the micro-batches."""
    losses = [contrastive(hidden_states[i:i + micro_batch], encoder_hidden_states[i:i + micro_batch])
              for i in range(0, hidden_states.shape[0], micro_batch)]
    return torch.stack(losses).mean()


def cosine_similarity_loss(x, y):
    x = F.normalize(x, p=2, dim=1)
    y = F.normalize(y, p=2, dim=1)
    return 1 - (x * y).sum(dim=1).mean()


def total_loss(image, text, contrastive_loss, align_text, align_image, w=WEIGHTS):
    return (image + text * w["text"] + w["contrastive"] * contrastive_loss
            + w["align_text"] * align_text + w["align_image"] * align_image)
