"""Dense DPO (DDPO), the preference loss of RLHF-V (Yu et al., CVPR 2024, arXiv 2312.00849).

Pure functions of tensors and token ids: no model, no data loading, only torch (and the standard
library's difflib for the segment diff), so every number can be checked by hand:

    python -m pytest tests/test_ddpo.py

One DDPO step, for B pairs whose 2B rows are stacked chosen-then-rejected (data.Batcher.pairs does
the first line, train.forward_loss the rest; ref_logp is the reference model's token_logps of the
same rows, computed once before training and cached: train.RefCache):
    cw, rw = token_weights(prompt + chosen, prompt + rejected, gamma)   # per pair, then sliced to
                                                             # the answers and padded: weights [2B, T-1]
    logp, mask = token_logps(logits, labels)                 # [2B, T-1], the policy's
    s = weighted_scores(logp, mask, weights)                 # [2B]   paper Eq. 5
    ref = weighted_scores(ref_logp, mask, weights)           # [2B]   the reference's, from its cache
    losses, r_w, r_l = ddpo_loss(s[:B], s[B:], ref[:B], ref[B:], beta)   # paper Eq. 4
"""
import difflib

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logps(logits, labels):
    """Log-probability of each label under the logits of the position before it.

    logits [B, T, V] (any float dtype), labels [B, T] with IGNORE_INDEX where there is no target.
    Returns (logp [B, T-1] fp32, mask [B, T-1] bool); logp is 0 where mask is False.
    log p = z_y - logsumexp(z): computed in fp32 without building a full log_softmax tensor
    (the cast is a no-op for fp32 logits).
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = picked - logits.logsumexp(-1)
    return logp.masked_fill(~mask, 0.0), mask


def token_weights(chosen_ids, rejected_ids, gamma, min_match=3):
    """Per-token weights from the segment-level correction (paper Sec. 3.2, gamma of Eq. 5).

    chosen_ids, rejected_ids: token ids (lists of int) of the corrected and the original answer,
    each after the same prompt (data.Batcher.pairs passes prompt + answer and keeps the answer's part).
    Returns (chosen_w [len(chosen_ids)], rejected_w [len(rejected_ids)]) float tensors, 1 or gamma.
    The corrected segments are recovered from the token diff, as RLHF-V does: matching blocks
    shorter than min_match are dropped, and a gap between blocks weighs gamma on both sides only
    if both sides are non-empty (a substitution); insertions and deletions keep weight 1.
    """
    # autojunk=False, unlike the original code: with difflib's default, tokens frequent in a long
    # answer cannot seed a match, so the weights would depend on the answer's length
    sm = difflib.SequenceMatcher(None, rejected_ids, chosen_ids, autojunk=False)
    blocks = [b for b in sm.get_matching_blocks() if b.size >= min_match or b.size == 0]
    chosen_w = torch.ones(len(chosen_ids))
    rejected_w = torch.ones(len(rejected_ids))
    r0 = c0 = 0
    for r, c, size in blocks:  # the last block is difflib's (len_r, len_c, 0) sentinel
        if r > r0 and c > c0:
            rejected_w[r0:r] = gamma
            chosen_w[c0:c] = gamma
        r0, c0 = r + size, c + size
    return chosen_w, rejected_w


def weighted_scores(logp, mask, weights, average=True):
    """Token-weighted sequence log-probability (paper Eq. 5).

    logp, mask, weights: [N, T-1] (weights aligned with the shifted labels). Returns [N]:
    average=True:  sum(w*m*logp) / sum(w*m)   = (1/N)[sum_u log p + gamma sum_c log p], the paper;
    average=False: sum(w*m*logp), the plain weighted sum of the later released configuration.
    """
    wm = weights * mask
    total = (wm * logp).sum(-1)
    return total / wm.sum(-1).clamp_min(1e-8) if average else total


def ddpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO loss on (dense) sequence scores (paper Eq. 4; Rafailov et al. 2023, Eq. 7).

    All inputs [B]: scores of the chosen (corrected) and rejected (original) answers under the
    policy and the frozen reference. Returns (losses [B], chosen_rewards [B], rejected_rewards [B]):
      losses = -log sigmoid(beta * ((pi_w - pi_l) - (ref_w - ref_l)))
      rewards = beta * (pi - ref), detached (the implicit reward of DPO, for logging only).
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -F.logsigmoid(beta * h)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def ddpo_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, ref_chosen,
                 ref_rejected):
    """The quantities RLHF-V logs, as 0-d tensors (no host sync; the caller decides when to read)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
        "logps/ref_chosen": ref_chosen.mean(),
        "logps/ref_rejected": ref_rejected.mean(),
    }
