"""The method: every group loss of AFT and its baselines, as pure functions of a score tensor.

Layout shared by every function here: ``scores`` and ``labels`` are (groups x candidates) float tensors,
one row per question, one column per sampled chain of thought (COT). ``labels`` higher is better: binary
feedback is 1 (answer right) / 0 (wrong), ranking feedback any graded value. ``mask`` (bool, same shape)
is True for real candidates, so groups of different sizes share one padded tensor. Every ordered pair
(i, j) of real candidates with ``labels[i] > labels[j]`` is a (better, worse) pair; equal labels are not
compared. A group without a pair contributes 0.

The score of a COT c for question q is its length-normalised log-likelihood (see ``aft.scoring``)::

    s(c) = (1/|c|) * sum_j log p(c_j | q, c_<j)

Constraints (Wang et al. 2023, "Making Large Language Models Better Reasoners with Alignment",
arXiv 2309.02144, section 4). An unconstrained ranking loss pushes the worse candidates' scores down
without bound and the model collapses. Every loss here takes ``constraint``:

- ``"none"``: the plain loss.
- ``"detach"`` (DC): the worse candidate of each pair gets no gradient (stop-gradient, ``sg``).
- ``"boundary"`` (BC): for each worse candidate j, a boundary ``B_j = min_{i better than j} s_i - beta``
  and, for each pair, a target ``T_ij = 2 B_j - s_i``, both constants (no gradient; *inferred*: the
  paper does not say). Each pair term ``phi(s_i - s_j)`` gains a mirror term ``phi(s_j - T_ij)``, so the
  force on s_j is ``phi'(s_j - T_ij) - phi'(s_i - s_j)``. Where ``phi`` is strictly convex (AFT's and PRO's
  ``log(1 + sum exp)``, DPO's softplus) the two forces are equal only when ``s_i - s_j = s_j - T_ij``,
  that is at ``s_j = B_j``: above B_j the worse score is pushed down, below it pulled back up. RRHF's
  hinge ``phi(x) = max(0, -x)`` is not strictly convex: its pair term pushes s_j down only while
  ``s_j > s_i`` and its mirror pulls it up only while ``s_j < T_ij``, so there is no force anywhere in
  ``[T_ij, s_i]`` and no equilibrium at B_j (the boundary only stops s_j falling below T_ij). With binary
  labels all B_j equal ``min_{p in P} s_p - beta``, the paper's boundary. ``beta -> inf`` gives back "none".
  ``beta`` is a margin on the length-normalised scores s (nats per token); DPO's boundary is in DPO's own
  units (``dpo_loss``'s ``dpo_boundary``).

The ranking form of the boundary (B_j over the candidates better than j) is our generalisation; it
reduces exactly to the paper's binary case. Reductions: ``"mean"`` over groups (groups without a pair
count as 0), ``"sum"``, or ``"none"`` (one value per group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONSTRAINTS = ("none", "detach", "boundary")
REDUCTIONS = ("mean", "sum", "none")


def pair_mask(labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(G, K, K) bool: ``[g, i, j]`` is True when candidate i is better than candidate j in group g."""
    if mask is None:
        mask = torch.ones_like(labels, dtype=torch.bool)
    better = labels.unsqueeze(2) > labels.unsqueeze(1)
    return better & mask.unsqueeze(2) & mask.unsqueeze(1)


def _check(scores, labels, mask, constraint, reduction):
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(f"scores and labels must both be (groups x candidates); got {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    if mask is not None and mask.shape != scores.shape:
        raise ValueError(f"mask must have the shape of scores {tuple(scores.shape)}; got {tuple(mask.shape)}")
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint must be one of {CONSTRAINTS}; got {constraint!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def _reduce(per_group: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_group.mean() if per_group.numel() else per_group.sum()
    if reduction == "sum":
        return per_group.sum()
    return per_group


def pair_terms(scores: torch.Tensor, pairs: torch.Tensor, constraint: str, beta: float):
    """The arguments of ``phi`` for every pair, shared by all losses.

    Returns ``(margin, mirror)``, each (G, K, K): ``margin[g,i,j] = s_i - s_j`` (with s_j detached under
    "detach"), and ``mirror[g,i,j] = s_j - T_ij`` under "boundary" (None otherwise). Entries outside
    ``pairs`` are finite but meaningless: callers mask them.
    """
    s_better = scores.unsqueeze(2)                      # s_i along dim 1
    worse = scores.detach() if constraint == "detach" else scores
    margin = s_better - worse.unsqueeze(1)              # s_i - s_j
    if constraint != "boundary":
        return margin, None
    s = scores.detach()
    has_better = pairs.any(dim=1)                       # (G, K): j has at least one better candidate
    inf = torch.full_like(s, float("inf"))
    lowest_better = torch.where(pairs, s.unsqueeze(2).expand_as(pairs), inf.unsqueeze(2)).amin(dim=1)
    # B_j; a finite placeholder where j has no better candidate keeps inf out of the graph (0 * inf = nan).
    boundary = torch.where(has_better, lowest_better - beta, torch.zeros_like(s))
    target = 2 * boundary.unsqueeze(1) - s.unsqueeze(2)  # T_ij = 2 B_j - s_i
    mirror = scores.unsqueeze(1) - target               # s_j - T_ij
    return margin, mirror


def _log1p_sum_exp(neg_args: torch.Tensor, select: torch.Tensor, dims) -> torch.Tensor:
    """log(1 + sum over selected entries of exp(x)), stably, reduced over ``dims``."""
    x = neg_args.masked_fill(~select, float("-inf")).flatten(start_dim=dims)
    zero = torch.zeros(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    return torch.logsumexp(torch.cat([zero, x], dim=-1), dim=-1)


def alignment_loss(scores, labels, mask=None, constraint: str = "boundary", beta: float = 0.5,
                   reduction: str = "mean"):
    """AFT's alignment loss of one group, with its constraint (METHOD.md, "The losses")::

        none:     L_A  = log(1 + sum_{(i,j)} exp(s_j - s_i))
        detach:   L_DC = log(1 + sum_{(i,j)} exp(sg(s_j) - s_i))
        boundary: L_BC = log(1 + sum_{(i,j)} [exp(s_j - s_i) + exp(T_ij - s_j)]),  T_ij = 2 B_j - s_i

    over every (better i, worse j) pair of the group; with binary labels this is the paper's sum over
    positives p and negatives n.
    """
    _check(scores, labels, mask, constraint, reduction)
    pairs = pair_mask(labels, mask)
    margin, mirror = pair_terms(scores, pairs, constraint, beta)
    args = -margin
    select = pairs
    if mirror is not None:  # both kinds of term sit inside the same log(1 + sum exp)
        args = torch.cat([args, -mirror], dim=-1)
        select = torch.cat([pairs, pairs], dim=-1)
    return _reduce(_log1p_sum_exp(args, select, dims=1), reduction)


def pro_loss(scores, labels, mask=None, constraint: str = "none", beta: float = 0.5, reduction: str = "mean"):
    """PRO (Song et al. 2023), list-wise softmax over the candidates sorted best first::

        L_PRO = sum_t -log(exp(s_t) / sum_{j >= t} exp(s_j)) = sum_t log(1 + sum_{j worse than t} exp(s_j - s_t))

    The right-hand form (candidates of equal label are not compared) is AFT's loss taken once per better
    candidate t, which is how the constraint applies: "detach" stops the gradient of every s_j in the
    denominators, "boundary" adds ``exp(T_tj - s_j)`` inside each log as in ``alignment_loss``.
    """
    _check(scores, labels, mask, constraint, reduction)
    pairs = pair_mask(labels, mask)
    margin, mirror = pair_terms(scores, pairs, constraint, beta)
    args, select = -margin, pairs
    if mirror is not None:
        args = torch.cat([args, -mirror], dim=-1)
        select = torch.cat([pairs, pairs], dim=-1)
    per_better = _log1p_sum_exp(args, select, dims=2)  # (G, K): one softmax term per candidate t
    return _reduce(per_better.sum(dim=1), reduction)


def rrhf_loss(scores, labels, mask=None, constraint: str = "none", beta: float = 0.5, reduction: str = "mean"):
    """RRHF's ranking hinge (Yuan et al. 2023), summed over (better i, worse j) pairs::

        L_RRHF = sum_{(i,j)} max(0, s_j - s_i)      [+ max(0, T_ij - s_j) under "boundary"]

    The NLL on the best candidate that RRHF adds is ``nll_loss``; the trainer adds it (``nll_on="best"``).
    """
    _check(scores, labels, mask, constraint, reduction)
    pairs = pair_mask(labels, mask)
    margin, mirror = pair_terms(scores, pairs, constraint, beta)
    per_pair = F.relu(-margin)
    if mirror is not None:
        per_pair = per_pair + F.relu(-mirror)
    return _reduce((per_pair * pairs).sum(dim=(1, 2)), reduction)


def dpo_loss(logps, labels, ref_logps, mask=None, dpo_beta: float = 0.1, constraint: str = "none",
             dpo_boundary: float = 2.0, reduction: str = "mean"):
    """DPO (Rafailov et al. 2023) over every (better i, worse j) pair of a group::

        r_c     = logp(c) - logp_ref(c)          (summed, not length-normalised, log-probs)
        L_DPO   = mean_{(i,j)} -log sigmoid(dpo_beta * (r_i - r_j))

    averaged over the group's pairs, so one pair per group is exactly TRL's ``sigmoid`` DPO loss.
    ``dpo_beta`` is DPO's temperature (TRL's ``beta``). The constraint acts on the implicit rewards r:
    "detach" stops the gradient of r_j, "boundary" adds ``-log sigmoid(dpo_beta * (r_j - T_ij))`` with::

        B_j = min_{i better than j} r_i - dpo_boundary / dpo_beta,      T_ij = 2 B_j - r_i

    The boundary is in DPO's own units (our choice; the paper does not define a constrained DPO): the
    margin ``dpo_boundary`` is on the logit ``dpo_beta * r`` that DPO's sigmoid reads, so the negative's
    equilibrium is where the model prefers the lowest better candidate over it by that logit (2: a
    preference of sigmoid(2) = 0.88), whatever the temperature and the length of the COTs. A margin of
    ``beta`` (~0.05-0.5, made for length-normalised scores) on summed log-prob rewards of tens of nats
    would put the boundary almost on the positives and freeze the negatives.
    """
    _check(logps, labels, mask, constraint, reduction)
    if ref_logps.shape != logps.shape:
        raise ValueError(f"ref_logps must have the shape of logps {tuple(logps.shape)}")
    pairs = pair_mask(labels, mask)
    rewards = logps - ref_logps.detach()
    margin, mirror = pair_terms(rewards, pairs, constraint, dpo_boundary / dpo_beta)
    per_pair = F.softplus(-dpo_beta * margin)  # -log sigmoid(x) = softplus(-x)
    if mirror is not None:
        per_pair = per_pair + F.softplus(-dpo_beta * mirror)
    n_pairs = pairs.sum(dim=(1, 2))
    per_group = (per_pair * pairs).sum(dim=(1, 2)) / n_pairs.clamp(min=1)
    return _reduce(per_group, reduction)


def nll_loss(logprob_sums: torch.Tensor, token_counts: torch.Tensor, weights: torch.Tensor | None = None):
    """Token-level negative log-likelihood over the selected sequences::

        L_NLL = - sum_c w_c * sum_j log p(c_j | q, c_<j) / sum_c w_c * |c|

    ``logprob_sums`` and ``token_counts`` are what ``aft.scoring.completion_logprobs`` returns (any
    shape, matching); ``weights`` (same shape, 0/1 or float) picks which sequences count: the
    reference COT, the positives, or both (the align stage's ``nll_on`` option). No selected token: 0.
    """
    if weights is None:
        weights = torch.ones_like(logprob_sums)
    weights = weights.to(logprob_sums.dtype)
    tokens = (weights * token_counts.to(logprob_sums.dtype)).sum()
    return -(weights * logprob_sums).sum() / tokens.clamp(min=1)
