"""The DDPO loss, checked by hand (paper Eq. 4 and 5; spec section 1 and 2)."""
import difflib
import math

import pytest
import torch

import ddpo


def test_token_logps_by_hand():
    """logits [0, ln 3] give p = (1/4, 3/4): log p(1) = ln 0.75 = -0.287682; the first position has
    no target (labels are shifted by one) and a -100 label is masked to 0."""
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [5.0, 1.0]]])
    labels = torch.tensor([[0, 1, -100]])
    logp, mask = ddpo.token_logps(logits, labels)
    assert mask.tolist() == [[True, False]]
    assert logp[0, 0].item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert logp[0, 1].item() == 0.0


def test_token_logps_equals_log_softmax_in_bf16():
    """bf16 logits are scored in fp32: the result equals log_softmax of the fp32 copy."""
    logits = torch.randn(2, 5, 11).bfloat16()
    labels = torch.randint(0, 11, (2, 5))
    logp, _ = ddpo.token_logps(logits, labels)
    want = logits.float()[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:, None])[..., 0]
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, want)


def test_weighted_scores_by_hand():
    """logp (-1, -2, -3, masked), weights (1, 5, 1, 7): the weighted sum is -1 - 10 - 3 = -14 and
    the weighted length 1 + 5 + 1 = 7, so Eq. 5's average is -2 (the masked weight 7 counts nowhere)."""
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = torch.tensor([[1.0, 5.0, 1.0, 7.0]])
    assert ddpo.weighted_scores(logp, mask, w, average=False).item() == -14.0
    assert ddpo.weighted_scores(logp, mask, w, average=True).item() == -2.0


def test_ddpo_loss_by_hand():
    """pi_w = -1, pi_l = -2, ref_w = ref_l = -1.5, beta 0.5: h = (-1 + 2) - 0 = 1,
    loss = -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077; rewards 0.5 * (pi - ref) = +0.25, -0.25."""
    losses, r_w, r_l = ddpo.ddpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]),
                                      torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.5)
    assert losses.item() == pytest.approx(0.474077, abs=1e-6)
    assert (r_w.item(), r_l.item()) == (0.25, -0.25)
    m = ddpo.ddpo_metrics(r_w, r_l, torch.tensor([-1.0]), torch.tensor([-2.0]),
                          torch.tensor([-1.5]), torch.tensor([-1.5]))
    assert m["rewards/margins"].item() == 0.5 and m["rewards/accuracies"].item() == 1.0


@pytest.mark.parametrize("average", [True, False])
def test_gamma_one_is_dpo(average):
    """With gamma = 1 every weight is 1, and the loss is DPO's (Rafailov et al., Eq. 7) on the plain
    summed log-probs, or on the per-token mean when averaging."""
    chosen, rejected = [4, 5, 6, 7, 8, 9], [4, 5, 1, 2, 8, 9, 3]
    wc, wr = ddpo.token_weights(chosen, rejected, gamma=1.0)
    assert wc.tolist() == [1.0] * 6 and wr.tolist() == [1.0] * 7
    logp = -torch.rand(4, 7)
    mask = torch.tensor([[1] * 6 + [0], [1] * 7] * 2).bool()
    w = torch.stack([torch.cat([wc, torch.zeros(1)]), wr] * 2)
    s = ddpo.weighted_scores(logp, mask, w, average)
    plain = (logp * mask).sum(-1) / (mask.sum(-1) if average else 1)
    torch.testing.assert_close(s, plain)
    losses, _, _ = ddpo.ddpo_loss(s[0:1], s[1:2], s[2:3], s[3:4], beta=0.1)
    dpo = -torch.nn.functional.logsigmoid(0.1 * ((plain[0] - plain[2]) - (plain[1] - plain[3])))
    torch.testing.assert_close(losses[0], dpo)


def test_loss_is_ln2_when_policy_is_reference():
    s = torch.randn(5, 2)
    losses, r_w, r_l = ddpo.ddpo_loss(s[:, 0], s[:, 1], s[:, 0], s[:, 1], beta=0.5)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2)))
    assert r_w.abs().max() == 0 and r_l.abs().max() == 0


def test_token_weights_substitution():
    """"3 dogs" -> "2 cats": the replaced tokens weigh gamma in both answers, the rest 1."""
    rejected, chosen = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 5, 6, 7, 8]
    wc, wr = ddpo.token_weights(chosen, rejected, gamma=5.0)
    assert wc.tolist() == [1, 1, 1, 5, 1, 1, 1, 1] and wr.tolist() == [1, 1, 1, 5, 1, 1, 1, 1]


def test_token_weights_insertion_and_deletion_keep_weight_one():
    """Only substitutions are emphasised: text the annotator added (insertion) or removed
    (deletion) has an empty side, and RLHF-V's diff leaves it at weight 1."""
    base, longer = [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 9, 9, 4, 5, 6, 7]
    for chosen, rejected in ((longer, base), (base, longer)):
        wc, wr = ddpo.token_weights(chosen, rejected, gamma=5.0)
        assert set(wc.tolist()) == {1.0} and set(wr.tolist()) == {1.0}


def test_token_weights_close_edits_merge():
    """Two edits 1 token apart: the shared token between them is a matching block shorter than
    min_match = 3, so it is dropped and the three tokens form one corrected segment."""
    rejected = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    chosen = [1, 2, 3, 40, 5, 60, 7, 8, 9, 10]
    wc, wr = ddpo.token_weights(chosen, rejected, gamma=2.0)
    assert wc.tolist() == [1, 1, 1, 2, 2, 2, 1, 1, 1, 1] == wr.tolist()
    wc, _ = ddpo.token_weights(chosen, rejected, gamma=2.0, min_match=1)
    assert wc.tolist() == [1, 1, 1, 2, 1, 2, 1, 1, 1, 1]


def test_token_weights_identical():
    wc, wr = ddpo.token_weights([3, 1, 4, 1, 5], [3, 1, 4, 1, 5], gamma=5.0)
    assert wc.tolist() == [1.0] * 5 == wr.tolist()


def test_token_weights_autojunk_off():
    """In a 200+ token answer, difflib's default autojunk forbids tokens more frequent than 1% from
    seeding a match: after one substitution in a long run of a frequent token, the rest of the
    run matches nothing and 301 tokens would weigh gamma. With autojunk=False only the substituted
    token does."""
    rejected, chosen = [5] * 10 + [9] + [5] * 300, [5] * 10 + [8] + [5] * 300
    junk = difflib.SequenceMatcher(None, rejected, chosen).get_matching_blocks()
    assert [b.size for b in junk] == [10, 0]  # what autojunk=True would have given
    wc, wr = ddpo.token_weights(chosen, rejected, gamma=5.0)
    assert wc.tolist() == wr.tolist() == [1.0] * 10 + [5.0] + [1.0] * 300
