"""Effective robustness, bias metrics against hand-computed tables, shifted test sets, coloured digits."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from simulator import classifiers
from simulator.contamination import bias, shifts
from simulator.contamination import robustness as rb
from simulator.data.colored import color_attribute, make_colored

# ---- effective robustness ------------------------------------------------------------------------

W, B = 1.3, -0.4
CLEAN = [0.55, 0.62, 0.7, 0.78, 0.85, 0.9, 0.95]


def on_line(clean: float) -> float:
    return rb.sigmoid(W * rb.logit(clean) + B)


def test_fit_recovers_a_logit_line_and_baselines_on_it_have_zero_effective_robustness():
    fit = rb.fit_line(CLEAN, [on_line(c) for c in CLEAN])
    assert fit == pytest.approx((W, B), abs=1e-9)
    for c in CLEAN:
        assert abs(rb.effective_robustness(fit, c, on_line(c))) < 1e-12


def test_points_above_the_line_have_positive_effective_robustness():
    fit = rb.fit_line(CLEAN, [on_line(c) for c in CLEAN])
    assert rb.effective_robustness(fit, 0.8, on_line(0.8) + 0.05) == pytest.approx(0.05, abs=1e-12)
    assert rb.effective_robustness(fit, 0.8, on_line(0.8) - 0.03) == pytest.approx(-0.03, abs=1e-12)


def test_rows_get_er_columns_only_with_six_baselines():
    rows = [{"kind": "baseline", "acc_clean": c, "acc_shift_mean": on_line(c)} for c in CLEAN[:5]]
    rows.append({"kind": "contaminated", "acc_clean": 0.8, "acc_shift_mean": on_line(0.8) + 0.1})
    assert rb.add_effective_robustness(rows) == {} and "er_shift_mean" not in rows[-1]
    rows.insert(0, {"kind": "reference", "acc_clean": CLEAN[5], "acc_shift_mean": on_line(CLEAN[5])})
    fits = rb.add_effective_robustness(rows)
    assert fits["acc_shift_mean"]["points"] == 6
    assert rows[-1]["er_shift_mean"] == pytest.approx(0.1, abs=1e-9)
    assert all(abs(r["er_shift_mean"]) < 1e-9 for r in rows if r["kind"] != "contaminated")


# ---- bias metrics: a hand-computed example --------------------------------------------------------
# Two classes, two attributes, class y aligned with attribute y. Test rows (y, a, prediction):
#   (0,0,0) (0,0,0) (0,1,1) (0,1,1) (1,0,0) (1,0,1) (1,1,1) (1,1,1)
# Group accuracies: (0,0) 1, (0,1) 0, (1,0) 1/2, (1,1) 1 -> worst group 0.
# Aligned rows {0,1,6,7} all right (1.0); conflicting rows {2,3,4,5}: only row 5 right (0.25).
# P(p=0 | a=0) = 3/4, P(p=0 | a=1) = 0 -> DP gap 3/4 for class 0, and 3/4 for class 1: DP = 0.75.
# Class 0: TPR 1 vs 0 (gap 1), FPR 1/2 vs 0; class 1: TPR 1/2 vs 1, FPR 0 vs 1 (gap 1): EO = 1.
# Training counts n(y, a): [[6, 2], [3, 9]] -> b*(0,0) = b*(1,1) = 3/4; predicted b~(0,0) = 3/3,
# b~(1,1) = 4/5: BiasAmp = ((1 - 3/4) + (4/5 - 3/4)) / 2 = 0.15.
# Directional (a -> t): y_ac = 1 for (0,0) and (1,1) (P(y,a) > P(y)P(a) in training); D = P(p=c|a) -
# P(y=c|a): D(a0,c0) = 3/4 - 1/2, D(a0,c1) = -1/4, D(a1,c0) = -1/2, D(a1,c1) = 1/2
# -> (1/4 + 1/2 + 1/4 + 1/2) / 4 = 0.375.
Y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
A = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
P = torch.tensor([0, 0, 1, 1, 0, 1, 1, 1])
TRAIN_Y = torch.tensor([0] * 8 + [1] * 12)
TRAIN_A = torch.tensor([0] * 6 + [1] * 2 + [0] * 3 + [1] * 9)
ALIGNED = torch.tensor([0, 1])


def test_bias_metrics_match_the_hand_computed_table():
    m = bias.classifier_bias(Y, A, P, TRAIN_Y, TRAIN_A, ALIGNED, 2, 2)
    assert m["worst_group_acc"] == 0.0
    assert (m["aligned_acc"], m["conflicting_acc"], m["align_gap"]) == (1.0, 0.25, 0.75)
    assert m["dp_diff"] == pytest.approx(0.75)
    assert m["eo_diff"] == pytest.approx(1.0)
    assert m["biasamp"] == pytest.approx(0.15)
    assert m["biasamp_at"] == pytest.approx(0.375)
    assert m["train_aligned_frac"] == pytest.approx(15 / 20)
    acc = bias.group_accuracy(Y, A, P, 2, 2)
    assert acc.tolist() == [[1.0, 0.0], [0.5, 1.0]]


def test_a_perfect_classifier_has_no_gaps_and_no_amplification():
    m = bias.classifier_bias(Y, A, Y, TRAIN_Y, TRAIN_A, ALIGNED, 2, 2)
    assert m["worst_group_acc"] == 1.0 and m["align_gap"] == 0.0 and m["eo_diff"] == 0.0
    assert m["biasamp_at"] == 0.0
    assert m["dp_diff"] == 0.0  # the test set is balanced: P(y = c | a) is the same for every a


def test_each_bias_metric_is_read_against_a_perfect_classifier_on_the_same_sets():
    m = bias.classifier_bias_vs_perfect(Y, A, P, TRAIN_Y, TRAIN_A, ALIGNED, 2, 2)
    # b*(0, 0) = 6/8 and b*(1, 1) = 9/12 in training; a perfect classifier on the balanced test set has
    # b~ = 1/2 there, so its Zhao BiasAmp is (1/|C|) sum (1/2 - b*) = (-1/4 - 1/4) / 2, not 0
    assert m["biasamp_perfect"] == pytest.approx(-0.25)
    assert m["biasamp_vs_perfect"] == pytest.approx(0.15 + 0.25)
    assert (m["worst_group_acc_perfect"], m["align_gap_perfect"], m["eo_diff_perfect"]) == (1.0, 0.0, 0.0)
    assert m["worst_group_acc_vs_perfect"] == -1.0 and m["align_gap_vs_perfect"] == pytest.approx(0.75)
    for name in bias.REFERENCED:
        assert m[f"{name}_vs_perfect"] == pytest.approx(m[name] - m[f"{name}_perfect"])
    same = bias.classifier_bias_vs_perfect(Y, A, Y, TRAIN_Y, TRAIN_A, ALIGNED, 2, 2)
    assert all(same[f"{name}_vs_perfect"] == 0 for name in bias.REFERENCED)


def test_a_perfect_classifiers_biasamp_reads_the_test_sets_own_shares_not_one_half():
    """On a test set balanced to one image (class 1: 3 images of colour 0 and 2 of colour 1) p = y puts
    the test set's shares where 1/2 would be: (1/|C|) sum (n(c, a)/n(c) - b*(c, a)) over b* > 1/2."""
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    a = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 1])
    m = bias.classifier_bias_vs_perfect(y, a, y, TRAIN_Y, TRAIN_A, ALIGNED, 2, 2)
    code = ((2 / 4 - 6 / 8) + (2 / 5 - 9 / 12)) / 2  # b*(0, 0) = 6/8, b*(1, 1) = 9/12 as above
    assert m["biasamp_perfect"] == pytest.approx(code)
    assert m["biasamp_perfect"] - (-0.25) == pytest.approx(-1 / (2 * 5) / 2)  # 1/(2 n(c)) per class, / |C|


def _draw_generated(
    real: torch.Tensor, n_per_class: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels n per class, attributes drawn from real's conditionals P(a | y): a generator that keeps the
    real bias exactly in expectation (neither amplifies nor dampens it)."""
    cond = real / real.sum(1, keepdim=True)
    y = torch.arange(len(real)).repeat_interleave(n_per_class)
    a = torch.multinomial(cond[y], 1, generator=g).squeeze(1)
    return y, a


@pytest.mark.parametrize("table", [[[20, 20, 20], [20, 20, 20]], [[30, 6, 4], [5, 25, 10]]])
def test_a_generator_that_keeps_the_real_proportions_leaves_biasamp_near_zero(table):
    real = torch.tensor(table)
    real_y = torch.arange(2).repeat_interleave(real.sum(1))
    real_a = torch.cat([torch.arange(3).repeat_interleave(row) for row in real])
    g = torch.Generator().manual_seed(0)
    zhao, directional = [], []
    for _ in range(400):
        y, a = _draw_generated(real.double(), 50, g)
        out = bias.generator_bias(y, a, real_y, real_a, torch.tensor([0, 1]), 2, 3)
        zhao.append(out["gen_biasamp"])
        directional.append(out["gen_biasamp_ta"])
    for values in (zhao, directional):
        v = torch.tensor(values, dtype=torch.float64)
        se = float(v.std() / math.sqrt(len(v)))
        assert abs(float(v.mean())) < 4 * se + 1e-12  # zero within four standard errors of these draws
    exact = bias.generator_bias(real_y, real_a, real_y, real_a, torch.tensor([0, 1]), 2, 3)
    assert exact["gen_biasamp"] == 0.0 and exact["gen_biasamp_ta"] == 0.0 and exact["gen_attr_tv"] == 0.0


def test_a_generator_that_drops_minority_attributes_amplifies_bias():
    real = torch.tensor([[30, 10], [10, 30]])
    real_y = torch.arange(2).repeat_interleave(real.sum(1))
    real_a = torch.cat([torch.arange(2).repeat_interleave(row) for row in real])
    gen_y, gen_a = torch.tensor([0] * 40 + [1] * 40), torch.tensor([0] * 40 + [1] * 40)  # only aligned
    out = bias.generator_bias(gen_y, gen_a, real_y, real_a, torch.tensor([0, 1]), 2, 2, seen_y=gen_y)
    assert out["gen_aligned_frac"] == 1.0 and out["real_aligned_frac"] == 0.75
    assert out["gen_biasamp"] == pytest.approx(0.25)  # b~ = 1 against b* = 3/4 in both classes
    assert out["gen_biasamp_ta"] == pytest.approx(0.25)  # |D| = 1/4 in all four (class, attribute) pairs
    assert out["gen_class_tv"] == 0.0


# ---- shifted test sets ---------------------------------------------------------------------------


def gray_images(n: int = 64, value: int = 128, ch: int = 3) -> torch.Tensor:
    return torch.full((n, ch, 8, 8), value, dtype=torch.uint8)


@pytest.mark.parametrize("name", list(shifts.SHIFTS))
def test_shifts_keep_shape_dtype_and_are_reproducible(name):
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = shifts.apply(name, x, 3, torch.Generator().manual_seed(1))
    b = shifts.apply(name, x, 3, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, x)


def test_gaussian_noise_has_the_cifar10c_standard_deviation():
    x = gray_images(200)
    y = shifts.apply("gaussian_noise", x, 5, torch.Generator().manual_seed(0)).double() - 128
    n = y.numel()
    sigma = math.sqrt((0.10 * 255) ** 2 + 1 / 12)  # plus the truncation to integers (uniform, var 1/12)
    assert abs(float(y.std()) - sigma) < 4 * sigma / math.sqrt(2 * n)
    assert abs(float(y.mean()) + 0.5) < 4 * sigma / math.sqrt(n)  # truncation lowers the mean by 1/2


# The published definitions (Hendrycks & Dietterich 2019, CIFAR-10-C), written here in numpy / scipy / PIL
# from their formulas: x in [0, 1] float64, corrupt, clip, times 255, numpy uint8 cast.
PUBLISHED = {
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "jpeg": (80, 65, 58, 50, 40),
}


def _published(name: str, img: np.ndarray, severity: int) -> np.ndarray:
    """One (h, w, ch) uint8 image through the published corruption."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    c = PUBLISHED[name][severity - 1]
    x = img / 255.0
    if name == "gaussian_blur":  # skimage.filters.gaussian(multichannel): no smoothing across channels
        out = gaussian_filter(x, sigma=(c, c, 0), mode="nearest", truncate=4.0)
    elif name == "contrast":
        means = np.mean(x, axis=(0, 1), keepdims=True)
        out = (x - means) * c + means
    else:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=c)
        return np.asarray(Image.open(buf))
    return np.uint8(np.clip(out, 0, 1) * 255)


@pytest.mark.parametrize("name", list(PUBLISHED))
@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_corruptions_match_the_published_cifar10c_definitions(name, severity):
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ours = shifts.apply(name, x, severity, torch.Generator()).permute(0, 2, 3, 1).numpy()
    ref = np.stack([_published(name, img, severity) for img in x.permute(0, 2, 3, 1).numpy()])
    diff = np.abs(ours.astype(int) - ref.astype(int))
    # float64 sums in another order can land a value on the other side of an integer before truncation:
    # one grey level, on a handful of pixels, is the most that may differ
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_every_severity_gets_its_own_shifted_set():
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sets = shifts.shifted_sets(x, ["contrast", "grayscale"], [1, 5], torch.Generator().manual_seed(0))
    assert sorted(sets) == ["contrast_s1", "contrast_s5"]  # grayscale does not apply to one channel
    assert torch.equal(sets["contrast_s5"], shifts.apply("contrast", x, 5, torch.Generator()))


def test_contrast_severity_is_monotone_and_grayscale_removes_colour():
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator()
    spread = [float(shifts.apply("contrast", x, s, g).double().std()) for s in range(1, 6)]
    assert spread == sorted(spread, reverse=True)
    gray = shifts.apply("grayscale", x, 5, g).int()
    assert (gray.max(1).values - gray.min(1).values).max() <= 1
    assert shifts.shifted_sets(x[:, :1], ["grayscale", "contrast"], 2, g).keys() == {"contrast"}
    with pytest.raises(ValueError, match="unknown shift 'fog'"):
        shifts.apply("fog", x, 1, g)
    with pytest.raises(ValueError, match=r"^severity: must be an integer in \[1, 5\], got 6$"):
        shifts.apply("contrast", x, 6, g)


# ---- coloured digits and classifiers --------------------------------------------------------------


def test_colored_digits_have_the_exact_correlation_a_balanced_test_set_and_a_readable_colour():
    d = make_colored("colored_digits", colors=3, strength=0.7, imbalance=3.0).load(
        generator=torch.Generator().manual_seed(0)
    )
    y, a = d.train_labels[0], d.train_attrs[0]
    for c in range(10):
        rows = y == c
        assert int((a[rows] == c % 3).sum()) == int(0.7 * int(rows.sum()) + 0.5)
        tc = torch.bincount(d.test_attrs[d.test_labels == c], minlength=3)
        assert int(tc.max() - tc.min()) <= 1
    sizes = torch.bincount(y, minlength=10)
    assert sizes[0] / sizes[9] == pytest.approx(3.0, rel=0.1)
    assert torch.equal(color_attribute(d.train[0], 3), a) and torch.equal(
        d.attribute_of(d.test), d.test_attrs
    )
    with pytest.raises(ValueError, match="options.strength"):
        make_colored("colored_digits", strength=1.5)


def test_a_grey_image_has_no_colour_and_is_left_out_of_the_bias_tables():
    grey = torch.full((2, 3, 8, 8), 90, dtype=torch.uint8)
    red = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    red[:, 0] = 200
    attrs = color_attribute(torch.cat([grey, red]), 2)
    assert attrs.tolist() == [-1, -1, 0]  # not colour 0: grey reads as no colour
    y = torch.tensor([0, 1, 1])
    assert bias.counts(y, attrs, 2, 2).tolist() == [[0.0, 0.0], [1.0, 0.0]]
    out = bias.generator_bias(y, attrs, y, torch.tensor([0, 1, 1]), torch.tensor([0, 1]), 2, 2)
    assert out["gen_no_attr_frac"] == pytest.approx(2 / 3) and out["gen_attr_props"] == [1.0, 0.0]
    assert out["gen_aligned_frac"] == pytest.approx(0.0)  # the grey ones are not in their aligned colour


@pytest.mark.parametrize(("arch", "shape"), [("mlp", (1, 8, 8)), ("cnn", (3, 8, 8)), ("resnet18", (3, 8, 8))])
def test_classifiers_are_seeded_and_train(arch, shape):
    x = torch.randint(0, 256, (16, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 2
    nets = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        net = classifiers.make_classifier(arch, shape, 2, generator=g, width=8, hidden=[16])
        stats = classifiers.train_classifier(
            net, x, y, steps=2, generator=g, batch_size=8, augment="crop_flip"
        )
        nets.append(net)
        assert math.isfinite(stats["loss_last"])
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(p, q)
    assert classifiers.predict(nets[0], x).shape == (16,)


def test_bias_is_drawn_against_alpha_and_against_the_generation_when_the_grid_has_them(tmp_path, monkeypatch):
    """bias_vs_alpha.png from substitute cells at several alpha (real-only at 0), bias_vs_generation.png
    from generations cells; a grid without bias metrics (plain digits) draws neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulator.contamination import report

    def row(mode, ratio, seed, gen_t=None, **metrics):
        return {"kind": "contaminated", "mode": mode, "ratio": ratio, "seed": seed, "gen_t": gen_t,
                "acc_clean": 0.9 - 0.1 * ratio, **metrics}  # fmt: skip

    colored = [
        row("substitute", a, s, worst_group_acc=0.3 - 0.1 * a + 0.01 * s, biasamp_vs_perfect=0.05 * a)
        for a in (0.0, 0.5, 1.0)
        for s in (0, 1, 2)
    ] + [
        row("generations", 1.0, s, gen_t=t, worst_group_acc=0.2, gen_aligned_frac=0.6)
        for t in (0, 1)
        for s in (0, 1)
    ]
    plain = [row("substitute", a, s) for a in (0.0, 1.0) for s in (0, 1)]
    run = tmp_path / "base"
    drawn = report._bias_figures([(run, {"name": "colored"}, colored, None)], tmp_path, plt)
    assert [p.name for p in drawn if p] == ["bias_vs_generation.png", "bias_vs_alpha.png"]
    assert all(p.stat().st_size > 0 for p in drawn)
    # the alpha curve is the Student-t mean over seeds per alpha: 0.31, 0.26, 0.21 for worst-group accuracy
    xs, mean, half = report._curve([r for r in colored if r["mode"] == "substitute"], "worst_group_acc")
    assert xs == [0.0, 0.5, 1.0] and np.allclose(mean, [0.31, 0.26, 0.21]) and all(h > 0 for h in half)
    assert report._bias_figures([(run, {"name": "digits"}, plain, None)], tmp_path / "none", plt) == [
        None,
        None,
    ]
