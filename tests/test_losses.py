"""Every loss against values worked out by hand; gradients of the constraints; masks and padding."""

import math

import pytest
import torch

from aft.losses import alignment_loss, dpo_loss, nll_loss, pair_mask, pro_loss, rrhf_loss

e = math.exp


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def grad_of(fn, scores, *args, **kwargs):
    scores = scores.clone().requires_grad_(True)
    fn(scores, *args, **kwargs).backward()
    return scores.grad[0]  # the one group's candidates


# ---- alignment_loss: hand-computed values -------------------------------------------------------------

def test_alignment_none_one_pair():
    # s_p = -1, s_n = -2:  log(1 + e^(s_n - s_p)) = log(1 + e^-1)
    loss = alignment_loss(t([-1.0, -2.0]), t([1.0, 0.0]), constraint="none")
    assert loss.item() == pytest.approx(math.log(1 + e(-1)))


def test_alignment_none_two_positives():
    # P = {-1, -1.5}, N = {-2}:  log(1 + e^(-2+1) + e^(-2+1.5)) = log(1 + e^-1 + e^-0.5) = 0.680270
    loss = alignment_loss(t([-1.0, -1.5, -2.0]), t([1.0, 1.0, 0.0]), constraint="none")
    assert loss.item() == pytest.approx(math.log(1 + e(-1) + e(-0.5)))
    assert loss.item() == pytest.approx(0.680270, abs=1e-6)


def test_alignment_detach_has_the_value_of_none():
    s, y = t([-1.0, -1.5, -2.0]), t([1.0, 1.0, 0.0])
    assert alignment_loss(s, y, constraint="detach").item() == pytest.approx(
        alignment_loss(s, y, constraint="none").item())


def test_alignment_boundary_binary():
    # beta = 0.5: B = min(-1, -1.5) - 0.5 = -2.0; T_1 = 2B - s_1 = -4 + 1 = -3, T_2 = -4 + 1.5 = -2.5
    # pair terms e^(s_n - s_p): e^-1, e^-0.5; mirror terms e^(T - s_n): e^(-3+2) = e^-1, e^(-2.5+2) = e^-0.5
    # L = log(1 + 2e^-1 + 2e^-0.5) = log(2.948820) = 1.081405
    loss = alignment_loss(t([-1.0, -1.5, -2.0]), t([1.0, 1.0, 0.0]), constraint="boundary", beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + 2 * e(-1) + 2 * e(-0.5)))
    assert loss.item() == pytest.approx(1.081405, abs=1e-6)


def test_alignment_ranking_none_and_boundary():
    # labels 2 > 1 > 0, scores s0 = -1, s1 = -2, s2 = -1.5; pairs (0,1), (0,2), (1,2)
    s, y = t([-1.0, -2.0, -1.5]), t([2.0, 1.0, 0.0])
    # none: log(1 + e^(-2+1) + e^(-1.5+1) + e^(-1.5+2)) = log(1 + e^-1 + e^-0.5 + e^0.5) = log(3.623131)
    base = 1 + e(-1) + e(-0.5) + e(0.5)
    assert alignment_loss(s, y, constraint="none").item() == pytest.approx(math.log(base))
    # boundary, beta = 0.5: B_1 = s0 - 0.5 = -1.5;  B_2 = min(s0, s1) - 0.5 = -2.5
    # T_01 = 2B_1 - s0 = -2;  T_02 = 2B_2 - s0 = -4;  T_12 = 2B_2 - s1 = -3
    # mirrors e^(T - s_j): e^(-2+2) = 1, e^(-4+1.5) = e^-2.5, e^(-3+1.5) = e^-1.5
    loss = alignment_loss(s, y, constraint="boundary", beta=0.5)
    assert loss.item() == pytest.approx(math.log(base + 1 + e(-2.5) + e(-1.5)))
    assert loss.item() == pytest.approx(1.595004, abs=1e-6)


def test_alignment_large_beta_gives_back_none():
    s, y = t([-1.0, -1.5, -2.0, -0.7]), t([1.0, 1.0, 0.0, 0.0])
    assert alignment_loss(s, y, constraint="boundary", beta=200.0).item() == pytest.approx(
        alignment_loss(s, y, constraint="none").item(), abs=1e-12)


def test_reductions():
    s = t([-1.0, -2.0], [-1.0, -1.0])
    y = t([1.0, 0.0], [1.0, 1.0])  # second group has no pair -> 0
    per_group = alignment_loss(s, y, constraint="none", reduction="none")
    assert per_group.tolist() == pytest.approx([math.log(1 + e(-1)), 0.0])
    assert alignment_loss(s, y, constraint="none", reduction="sum").item() == pytest.approx(math.log(1 + e(-1)))
    assert alignment_loss(s, y, constraint="none").item() == pytest.approx(math.log(1 + e(-1)) / 2)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="constraint"):
        alignment_loss(t([0.0, 1.0]), t([1.0, 0.0]), constraint="boundry")
    with pytest.raises(ValueError, match="groups x candidates"):
        alignment_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        alignment_loss(t([0.0, 1.0]), t([1.0, 0.0]), reduction="avg")


# ---- gradients of the constraints ---------------------------------------------------------------------

@pytest.mark.parametrize("loss_fn", [alignment_loss, pro_loss])
def test_boundary_gradient_on_negative_is_zero_at_b_and_pushes_towards_it(loss_fn):
    # P = {-1, -1.5}, beta = 0.5 -> B = -2.0
    y = t([1.0, 1.0, 0.0])
    at_b = grad_of(loss_fn, t([-1.0, -1.5, -2.0]), y, constraint="boundary", beta=0.5)
    above = grad_of(loss_fn, t([-1.0, -1.5, -1.8]), y, constraint="boundary", beta=0.5)
    below = grad_of(loss_fn, t([-1.0, -1.5, -2.6]), y, constraint="boundary", beta=0.5)
    assert at_b[2].item() == pytest.approx(0.0, abs=1e-12)
    assert above[2].item() > 0   # gradient descent moves s_n down, towards B
    assert below[2].item() < 0   # ... and up when it fell below B
    for g in (at_b, above, below):
        assert (g[:2] < 0).all()  # positives always pushed up


def test_boundary_gradient_ranking_zero_at_each_own_boundary():
    # labels 2 > 1 > 0. s0 = -1, beta = 0.5: B_1 = -1.5. Put s1 there; s2 at its own B_2 = min(s0, s1) - 0.5 = -2.0
    g = grad_of(alignment_loss, t([-1.0, -1.5, -2.0]), t([2.0, 1.0, 0.0]), constraint="boundary", beta=0.5)
    # s1 is a "worse" of s0 (pulled to B_1, zero there) and a "better" of s2 (pushed up): net push up
    assert g[2].item() == pytest.approx(0.0, abs=1e-12)
    assert g[0].item() < 0 and g[1].item() < 0


@pytest.mark.parametrize("loss_fn", [alignment_loss, pro_loss, rrhf_loss])
def test_detach_gives_negatives_no_gradient(loss_fn):
    g = grad_of(loss_fn, t([-1.0, -3.0, -0.5, -2.0]), t([1.0, 1.0, 0.0, 0.0]), constraint="detach")
    assert g[2].item() == 0.0 and g[3].item() == 0.0
    assert (g[:2] < 0).all()


def test_none_pushes_negatives_down_without_bound():
    g = grad_of(alignment_loss, t([-1.0, -30.0]), t([1.0, 0.0]), constraint="none")
    assert g[1].item() > 0  # still pushed down, however low it already is


def test_dpo_detach_and_boundary_gradients():
    logps, ref = t([-10.0, -12.0, -11.0]), t([-11.0, -11.0, -11.0])  # rewards 1, -1, 0
    y = t([1.0, 0.0, 0.0])
    g = grad_of(dpo_loss, logps, y, ref, constraint="detach")
    assert g[1].item() == 0.0 and g[2].item() == 0.0 and g[0].item() < 0
    # dpo_boundary 0.1 at dpo_beta 0.1: B = r_0 - 0.1 / 0.1 = 0, so candidate 2 (reward 0) sits on it;
    # candidate 1 is below it
    g = grad_of(dpo_loss, logps, y, ref, constraint="boundary", dpo_boundary=0.1)
    assert g[2].item() == pytest.approx(0.0, abs=1e-12)
    assert g[1].item() < 0 and g[0].item() < 0


@pytest.mark.parametrize("dpo_beta", [0.1, 0.5])
def test_dpo_boundary_is_a_margin_on_dpos_logit(dpo_beta):
    # The boundary sits dpo_boundary / dpo_beta nats of implicit reward below the lowest positive: here
    # r_p = 1 and dpo_boundary = 2, so B = 1 - 20 (dpo_beta 0.1) or 1 - 4 (dpo_beta 0.5). A negative there
    # feels no force; above it is pushed down, below it up.
    ref = t([0.0, 0.0])
    y = t([1.0, 0.0])
    boundary = 1.0 - 2.0 / dpo_beta

    def force(r_n):
        return grad_of(dpo_loss, t([1.0, r_n]), y, ref, dpo_beta=dpo_beta, constraint="boundary", dpo_boundary=2.0)[1]

    assert force(boundary).item() == pytest.approx(0.0, abs=1e-9)
    assert force(boundary + 1.0).item() > 0 and force(boundary - 1.0).item() < 0


def test_dpo_boundary_leaves_negatives_free_at_the_start():
    # At step 0 the policy is the reference: every reward is 0. Unconstrained DPO pushes the negative down
    # with force dpo_beta * sigmoid(0) = 0.05 (dpo_beta 0.1). The boundary 2 / 0.1 = 20 nats below adds the
    # mirror term's pull dpo_beta * sigmoid(-dpo_beta * 2 * 20) = 0.1 * sigmoid(-4) = 0.0018: the negative
    # keeps 96% of its push. (A margin of 0.5 nats, a length-normalised beta, would leave 0.0025: 5%.)
    logps = t([-30.0, -40.0])
    y = t([1.0, 0.0])
    free = grad_of(dpo_loss, logps, y, logps, constraint="none")[1].item()
    bounded = grad_of(dpo_loss, logps, y, logps, constraint="boundary")[1].item()
    assert free == pytest.approx(0.05)
    assert bounded == pytest.approx(0.05 - 0.1 * torch.sigmoid(torch.tensor(-4.0)).item())
    assert bounded / free > 0.95


# ---- masks and padding --------------------------------------------------------------------------------

ALL_LOSSES = [
    lambda s, y, m, c: alignment_loss(s, y, m, constraint=c, beta=0.3, reduction="none"),
    lambda s, y, m, c: pro_loss(s, y, m, constraint=c, beta=0.3, reduction="none"),
    lambda s, y, m, c: rrhf_loss(s, y, m, constraint=c, beta=0.3, reduction="none"),
    lambda s, y, m, c: dpo_loss(s, y, s * 0.9, m, constraint=c, dpo_boundary=0.03, reduction="none"),
]


@pytest.mark.parametrize("loss", ALL_LOSSES)
@pytest.mark.parametrize("constraint", ["none", "detach", "boundary"])
def test_padded_candidate_changes_nothing(loss, constraint):
    s, y = t([-1.0, -2.2, -1.7]), t([1.0, 0.0, 0.0])
    plain = loss(s, y, None, constraint)
    # a padded candidate with a label that would make it the best, and a large score: masked out
    s_pad, y_pad = t([-1.0, -2.2, -1.7, 5.0]), t([1.0, 0.0, 0.0, 9.0])
    m = torch.tensor([[True, True, True, False]])
    padded = loss(s_pad, y_pad, m, constraint)
    assert padded.tolist() == pytest.approx(plain.tolist())
    s_pad = s_pad.clone().requires_grad_(True)
    loss(s_pad, y_pad, m, constraint).sum().backward()
    assert s_pad.grad[0, 3].item() == 0.0


@pytest.mark.parametrize("loss", ALL_LOSSES)
@pytest.mark.parametrize("constraint", ["none", "detach", "boundary"])
def test_unequal_groups_degenerate_groups_and_single_candidates(loss, constraint):
    s = t([-1.0, -2.0, -1.5, 0.0], [-1.0, -2.0, 0.0, 0.0], [-1.0, -1.2, 0.0, 0.0],
          [-3.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0])
    y = t([1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0],
          [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out = loss(s, y, m, constraint)
    # group 2: only positives, group 3: only negatives, group 4: one candidate -> no pair -> 0
    assert out[2:].tolist() == [0.0, 0.0, 0.0]
    # groups 0 and 1 equal the same groups computed alone, unpadded
    assert out[0].item() == pytest.approx(loss(t([-1.0, -2.0, -1.5]), t([1.0, 0.0, 0.0]), None, constraint).item())
    assert out[1].item() == pytest.approx(loss(t([-1.0, -2.0]), t([1.0, 0.0]), None, constraint).item())
    assert torch.isfinite(out).all()


def test_no_nan_gradients_with_masks_and_boundary():
    s = t([-1.0, -2.0, 0.0], [-1.0, -1.0, 0.0]).requires_grad_(True)
    y = t([1.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    for fn in (alignment_loss, pro_loss, rrhf_loss):
        s.grad = None
        fn(s, y, m, constraint="boundary").backward()
        assert torch.isfinite(s.grad).all()


def test_pair_mask():
    pairs = pair_mask(t([2.0, 1.0, 1.0]), torch.tensor([[True, True, False]]))
    assert pairs[0].tolist() == [[False, True, False], [False, False, False], [False, False, False]]


# ---- the baselines: hand-computed values --------------------------------------------------------------

def test_pro_value():
    # labels 2 > 1 > 0, scores -1, -2, -1.5
    # t=0: -log(e^-1 / (e^-1 + e^-2 + e^-1.5)) = log(1 + e^-1 + e^-0.5) = 0.680270
    # t=1: -log(e^-2 / (e^-2 + e^-1.5))        = log(1 + e^0.5)          = 0.974077;  t=2: 0  (total 1.654347)
    loss = pro_loss(t([-1.0, -2.0, -1.5]), t([2.0, 1.0, 0.0]), constraint="none")
    assert loss.item() == pytest.approx(math.log(1 + e(-1) + e(-0.5)) + math.log(1 + e(0.5)))
    assert loss.item() == pytest.approx(1.654347, abs=1e-6)


def test_pro_binary_single_positive_equals_aft():
    s, y = t([-1.0, -2.0, -0.5]), t([1.0, 0.0, 0.0])
    assert pro_loss(s, y, constraint="none").item() == pytest.approx(alignment_loss(s, y, constraint="none").item())


def test_rrhf_values():
    # P = {-1, -2.5}, N = {-2}: hinge max(0, s_n - s_p): 0 for (-1, -2), 0.5 for (-2.5, -2)
    assert rrhf_loss(t([-1.0, -2.5, -2.0]), t([1.0, 1.0, 0.0])).item() == pytest.approx(0.5)
    # boundary, beta 0.5, P = {-1, -1.2}, N = {-4}: B = -1.7; T = 2B - s_p = -2.4 and -2.2
    # mirror hinges max(0, T - s_n): -2.4 + 4 = 1.6 and -2.2 + 4 = 1.8; pair hinges 0
    loss = rrhf_loss(t([-1.0, -1.2, -4.0]), t([1.0, 1.0, 0.0]), constraint="boundary", beta=0.5)
    assert loss.item() == pytest.approx(3.4)


def test_dpo_value():
    # rewards r = logp - ref = [-10+11, -12+11] = [1, -1]; beta 0.1: -log sigmoid(0.1 * 2) = log(1 + e^-0.2)
    loss = dpo_loss(t([-10.0, -12.0]), t([1.0, 0.0]), t([-11.0, -11.0]), dpo_beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + e(-0.2)))
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)


def test_dpo_mean_over_pairs():
    # P = {r=1}, N = {r=-1, r=0}: mean of log(1 + e^-0.2) and log(1 + e^-0.1)
    loss = dpo_loss(t([-10.0, -12.0, -11.0]), t([1.0, 0.0, 0.0]), t([-11.0, -11.0, -11.0]), dpo_beta=0.1)
    assert loss.item() == pytest.approx((math.log(1 + e(-0.2)) + math.log(1 + e(-0.1))) / 2)


def test_nll_loss():
    # token-level: -(-6 + -2) / (3 + 1) = 2.0; weights select only the first: 6 / 3 = 2.0; second: 2 / 1
    sums, counts = torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])
    assert nll_loss(sums, counts).item() == pytest.approx(2.0)
    assert nll_loss(sums, counts, torch.tensor([0.0, 1.0])).item() == pytest.approx(2.0)
    assert nll_loss(torch.tensor([-6.0, -1.0]), counts, torch.tensor([1.0, 0.0])).item() == pytest.approx(2.0)
    assert nll_loss(sums, counts, torch.zeros(2)).item() == 0.0


def test_rrhf_boundary_has_no_force_between_target_and_positive():
    # RRHF's hinge is not strictly convex, so its boundary is no equilibrium: with s_p = -1, beta 0.5, B = -1.5
    # and T = 2B - s_p = -2. The negative feels nothing anywhere in [T, s_p] = [-2, -1], B included; it is
    # pushed down above s_p and up below T.
    y = t([1.0, 0.0])
    for s_n in (-1.9, -1.5, -1.1):
        assert grad_of(rrhf_loss, t([-1.0, s_n]), y, constraint="boundary", beta=0.5)[1].item() == 0.0
    assert grad_of(rrhf_loss, t([-1.0, -0.5]), y, constraint="boundary", beta=0.5)[1].item() > 0
    assert grad_of(rrhf_loss, t([-1.0, -2.5]), y, constraint="boundary", beta=0.5)[1].item() < 0
