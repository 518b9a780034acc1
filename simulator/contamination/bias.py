"""Bias metrics over a discrete attribute a (e.g. a digit's colour) and the class y, from label tensors alone.

Classifier metrics take the test labels y, attributes a and predictions p (all (n,) int64):
- group accuracy over (y, a) groups; worst-group accuracy = the smallest over groups with examples;
- aligned / conflicting accuracy: examples whose attribute is (is not) the one their class is correlated
  with in training (`aligned[y]`), and their gap aligned - conflicting;
- demographic-parity difference: mean over classes c of max_a P(p=c | a) - min_a P(p=c | a);
- equalized-odds difference: mean over classes c of max(TPR gap, FPR gap) across attribute values, with
  TPR_a = P(p=c | y=c, a) and FPR_a = P(p=c | y!=c, a) (one-vs-rest, as fairlearn's binary definition);
- BiasAmp of Zhao et al. (2017): b(c, a) = n(c, a) / n(c) measured on the training set (b*) and on the
  predictions over the test set (b~); BiasAmp = (1/|C|) sum_{c,a} 1[b*(c,a) > 1/|A|] (b~(c,a) - b*(c,a));
- directional BiasAmp of Wang & Russakovsky (2021), attribute -> task:
  (1/(|A||C|)) sum_{a,c} [y_ac D_ac - (1 - y_ac) D_ac], y_ac = 1[P(a, c) > P(a) P(c)] on the training set,
  D_ac = P(p=c | a) - P(y=c | a) on the test set.
Every classifier metric is also read against its reference (`classifier_bias_vs_perfect`): the value a
perfect classifier (p = y) scores on the same test set against the same training set, and the difference
from it. A perfect classifier's Zhao BiasAmp is (1/|C|) sum_{c,a: b*(c,a) > 1/|A|} (n(c,a)/n(c) - b*(c,a)),
n the test set's counts (its predictions are the labels), not 0: a BiasAmp moving towards 0 can be the
training set's balance changing, not amplification. Only where every class's test images split exactly
evenly over the attributes is it (1/|C|) sum (1/|A| - b*) over those pairs; a test set balanced to one
image (two attributes, an odd class of n(c) test images split k / k + 1) moves each class's term by
1/(2 n(c)).
Generator metrics compare a generated set's (label, attribute) pairs with the real training set's: the
task -> attribute direction (D_ac = P_gen(a | c) - P_real(a | c)), total-variation drift of the class and
attribute proportions, and the fraction of aligned images (the realised correlation strength).
"""

from __future__ import annotations

import math

import torch


def counts(y: torch.Tensor, a: torch.Tensor, num_classes: int, num_attrs: int) -> torch.Tensor:
    """(num_classes, num_attrs) float64 table of how many rows have each (y, a) pair; rows with no attribute
    (a < 0, e.g. a grey image's colour) are left out."""
    has = a.cpu() >= 0
    flat = y.long().cpu()[has] * num_attrs + a.long().cpu()[has]
    return torch.bincount(flat, minlength=num_classes * num_attrs).double().view(num_classes, num_attrs)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with NaN where den is 0 (an empty group has no rate)."""
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))


def group_accuracy(
    y: torch.Tensor, a: torch.Tensor, p: torch.Tensor, num_classes: int, num_attrs: int
) -> torch.Tensor:
    """(num_classes, num_attrs) accuracy per (class, attribute) group; NaN for empty groups."""
    right = counts(y[p == y], a[p == y], num_classes, num_attrs)
    return _ratio(right, counts(y, a, num_classes, num_attrs))


def worst_group_accuracy(
    y: torch.Tensor, a: torch.Tensor, p: torch.Tensor, num_classes: int, num_attrs: int
) -> float:
    """The smallest accuracy over (class, attribute) groups that have test examples."""
    acc = group_accuracy(y, a, p, num_classes, num_attrs)
    return float(acc[~acc.isnan()].min())


def aligned_conflicting(
    y: torch.Tensor, a: torch.Tensor, p: torch.Tensor, aligned: torch.Tensor
) -> tuple[float, float]:
    """(accuracy on bias-aligned examples, accuracy on bias-conflicting ones); NaN when a side is empty."""
    is_aligned = a.cpu() == aligned.cpu()[y.cpu()]
    right = (p.cpu() == y.cpu()).double()
    coloured = a.cpu() >= 0  # an image with no attribute is neither aligned nor conflicting
    masks = (is_aligned, coloured & ~is_aligned)
    acc = [float(right[m].mean()) if m.any() else math.nan for m in masks]
    return acc[0], acc[1]


def _rate_gap(hit: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """max - min over attributes (last dim) of hit / base, ignoring attributes with base 0."""
    rate = _ratio(hit, base)
    hi = torch.where(rate.isnan(), -math.inf, rate).max(-1).values
    lo = torch.where(rate.isnan(), math.inf, rate).min(-1).values
    return torch.where(torch.isfinite(hi - lo), hi - lo, torch.zeros_like(hi))


def demographic_parity_difference(
    p: torch.Tensor, a: torch.Tensor, num_classes: int, num_attrs: int
) -> float:
    """Mean over classes c of the spread across attributes of P(predict c | a)."""
    pred = counts(p, a, num_classes, num_attrs)  # (c, a): how often c is predicted within attribute a
    return float(_rate_gap(pred, pred.sum(0, keepdim=True).expand_as(pred)).mean())


def equalized_odds_difference(
    y: torch.Tensor, a: torch.Tensor, p: torch.Tensor, num_classes: int, num_attrs: int
) -> float:
    """Mean over classes c (one-vs-rest) of max(TPR spread, FPR spread) across attribute values."""
    total = counts(y, a, num_classes, num_attrs)  # (c, a): rows of true class c with attribute a
    pred = counts(p, a, num_classes, num_attrs)
    tp = counts(y[p == y], a[p == y], num_classes, num_attrs)
    per_attr = total.sum(0, keepdim=True)
    tpr_gap = _rate_gap(tp, total)
    fpr_gap = _rate_gap(pred - tp, per_attr - total)
    return float(torch.maximum(tpr_gap, fpr_gap).mean())


def bias_amp_zhao(train: torch.Tensor, predicted: torch.Tensor) -> float:
    """Zhao et al.'s BiasAmp from (class, attribute) count tables of the training set and of predictions.

    Classes never predicted contribute 0 (their b~ is undefined); the mean is over all classes.
    """
    num_attrs = train.shape[1]
    b_star = _ratio(train, train.sum(1, keepdim=True))
    b_pred = _ratio(predicted, predicted.sum(1, keepdim=True))
    term = torch.where(b_star > 1 / num_attrs, b_pred - b_star, torch.zeros_like(b_star))
    return float(torch.nan_to_num(term, nan=0.0).sum() / train.shape[0])


def bias_amp_directional(
    train: torch.Tensor, truth: torch.Tensor, output: torch.Tensor, direction: str = "a->t"
) -> float:
    """Wang & Russakovsky's directional BiasAmp from (class, attribute) count tables.

    train fixes which pairs are positively correlated (y_ac); truth and output are the reference and the
    model's tables: for "a->t" the conditionals are P(class | attribute), for "t->a" P(attribute | class).
    """
    if direction not in ("a->t", "t->a"):
        raise ValueError(f"direction must be 'a->t' or 't->a', got {direction!r}")
    joint = train / train.sum()
    y_ac = joint > joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    dim = 0 if direction == "a->t" else 1  # normalise over classes (given a) or over attributes (given c)
    delta = _ratio(output, output.sum(dim, keepdim=True)) - _ratio(truth, truth.sum(dim, keepdim=True))
    signed = torch.where(y_ac, delta, -delta)
    return float(torch.nan_to_num(signed, nan=0.0).sum() / signed.numel())


def proportions(values: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) float64 frequencies of the values 0..k-1."""
    c = torch.bincount(values.long().cpu(), minlength=k).double()
    return c / c.sum().clamp_min(1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total-variation distance between two probability vectors."""
    return float(0.5 * (p - q).abs().sum())


def classifier_bias(
    y: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor,
    train_y: torch.Tensor,
    train_a: torch.Tensor,
    aligned: torch.Tensor,
    num_classes: int,
    num_attrs: int,
) -> dict[str, float]:
    """Every classifier bias metric on a test set (y, a) with predictions p, against its training set."""
    acc_aligned, acc_conflicting = aligned_conflicting(y, a, p, aligned)
    train = counts(train_y, train_a, num_classes, num_attrs)
    return {
        "worst_group_acc": worst_group_accuracy(y, a, p, num_classes, num_attrs),
        "aligned_acc": acc_aligned,
        "conflicting_acc": acc_conflicting,
        "align_gap": acc_aligned - acc_conflicting,
        "dp_diff": demographic_parity_difference(p, a, num_classes, num_attrs),
        "eo_diff": equalized_odds_difference(y, a, p, num_classes, num_attrs),
        "biasamp": bias_amp_zhao(train, counts(p, a, num_classes, num_attrs)),
        "biasamp_at": bias_amp_directional(
            train, counts(y, a, num_classes, num_attrs), counts(p, a, num_classes, num_attrs), "a->t"
        ),
        "train_aligned_frac": float((train_a.cpu() == aligned.cpu()[train_y.cpu()]).double().mean()),
    }


REFERENCED = ("worst_group_acc", "align_gap", "dp_diff", "eo_diff", "biasamp", "biasamp_at")


def classifier_bias_vs_perfect(
    y: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor,
    train_y: torch.Tensor,
    train_a: torch.Tensor,
    aligned: torch.Tensor,
    num_classes: int,
    num_attrs: int,
) -> dict[str, float]:
    """classifier_bias plus, per metric m of REFERENCED, m_perfect (a perfect classifier's value on the same
    test and training sets) and m_vs_perfect = m - m_perfect."""
    out = classifier_bias(y, a, p, train_y, train_a, aligned, num_classes, num_attrs)
    ref = classifier_bias(y, a, y, train_y, train_a, aligned, num_classes, num_attrs)
    for m in REFERENCED:
        out[f"{m}_perfect"] = ref[m]
        out[f"{m}_vs_perfect"] = out[m] - ref[m]
    return out


def generator_bias(
    gen_y: torch.Tensor,
    gen_a: torch.Tensor,
    real_y: torch.Tensor,
    real_a: torch.Tensor,
    aligned: torch.Tensor,
    num_classes: int,
    num_attrs: int,
    seen_y: torch.Tensor | None = None,
) -> dict[str, float | list[float]]:
    """How a generated set's (class, attribute) statistics drift from the real training set's.

    gen_y are the labels the samples were drawn for; seen_y (optional) are the classes a real-trained
    classifier sees in them, whose proportions are the class drift a label alone cannot show.
    """
    real, gen = counts(real_y, real_a, num_classes, num_attrs), counts(gen_y, gen_a, num_classes, num_attrs)
    gen_aligned = (gen_a.cpu() == aligned.cpu()[gen_y.cpu()]).double()
    by_class = [
        float(gen_aligned[gen_y.cpu() == c].mean()) if (gen_y == c).any() else math.nan
        for c in range(num_classes)
    ]
    out: dict[str, float | list[float]] = {
        "gen_aligned_frac": float(gen_aligned.mean()),
        "real_aligned_frac": float((real_a.cpu() == aligned.cpu()[real_y.cpu()]).double().mean()),
        "gen_aligned_by_class": by_class,
        "gen_attr_props": proportions(gen_a[gen_a >= 0], num_attrs).tolist(),
        "gen_no_attr_frac": float((gen_a < 0).double().mean()),
        "gen_attr_tv": total_variation(
            proportions(gen_a[gen_a >= 0], num_attrs), proportions(real_a[real_a >= 0], num_attrs)
        ),
        "gen_biasamp": bias_amp_zhao(real, gen),
        "gen_biasamp_ta": bias_amp_directional(real, real, gen, "t->a"),
    }
    if seen_y is not None:
        seen = proportions(seen_y, num_classes)
        out["gen_class_props"] = seen.tolist()
        out["gen_class_tv"] = total_variation(seen, proportions(real_y, num_classes))
    return out
