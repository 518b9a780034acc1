"""Contamination training sets: exact sizes and class fractions per mode, no real image twice, bad ratios."""

from __future__ import annotations

import pytest
import torch

from simulator.contamination.grid import Cell, plan, pool_needs
from simulator.contamination.mixing import (
    GENERATED,
    HELDOUT,
    REAL,
    ContaminationError,
    Pool,
    check_ratio,
    class_orders,
    class_sizes,
    extra_per_class,
    mix,
    split_real,
)

SIZES = [10, 7, 5, 3]  # deliberately uneven classes: rounding of alpha * n_y differs per class
K = len(SIZES)


def labelled(sizes: list[int], start: int) -> Pool:
    """A pool whose 'image' of row i is its global id start + i, so rows can be traced after mixing."""
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(start))]
    ids = torch.arange(start, start + len(labels))
    return Pool(ids.view(-1, 1), labels, attrs=ids % 2)


REAL_POOL = labelled(SIZES, 0)
GEN_POOL = labelled([2 * n + 1 for n in SIZES], 1000)  # enough for augment r = 2
RESERVE = labelled(SIZES, 5000)


def orders(pool: Pool, seed: int) -> list[torch.Tensor]:
    return class_orders(pool.labels, K, torch.Generator().manual_seed(seed))


def per_class(m, origin: int) -> list[int]:
    return torch.bincount(m.labels[m.origin == origin], minlength=K).tolist()


def build(mode: str, ratio: float, seed: int = 0):
    extra = RESERVE if mode == "control" else GEN_POOL
    return mix(mode, ratio, REAL_POOL, orders(REAL_POOL, seed), extra, orders(extra, seed + 100))


@pytest.mark.parametrize("mode", ["substitute", "control", "generations"])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.7, 1.0])
def test_replacement_keeps_size_and_replaces_round_alpha_n_per_class(mode, alpha):
    m = build(mode, alpha)
    k = [int(alpha * n + 0.5) for n in SIZES]  # floor(x + 1/2), per class
    other = HELDOUT if mode == "control" else GENERATED
    assert len(m.labels) == sum(SIZES) == len(m.images) == len(m.origin)
    assert per_class(m, other) == k
    assert per_class(m, REAL) == [n - j for n, j in zip(SIZES, k, strict=True)]
    assert torch.bincount(m.labels, minlength=K).tolist() == SIZES  # class proportions untouched
    # every row's image is its pool's row `index` and carries that row's label
    pools = {REAL: REAL_POOL, other: RESERVE if mode == "control" else GEN_POOL}
    for o, pool in pools.items():
        sel = m.origin == o
        assert torch.equal(m.images[sel], pool.images[m.index[sel]])
        assert torch.equal(m.labels[sel], pool.labels[m.index[sel]])


def test_counts_round_the_written_ratio_not_its_float_product():
    assert 0.7 * 45 < 31.5  # the float product falls just short of the half
    assert extra_per_class("substitute", 0.7, [45]) == [32]
    assert extra_per_class("augment", 0.5, [3, 5]) == [2, 3]  # halves round up, not to even
    assert extra_per_class("substitute", 0.1, [15]) == [2]  # 1.5 -> 2


@pytest.mark.parametrize("r", [0.0, 0.5, 1.0, 2.0])
def test_augment_adds_round_r_n_per_class(r):
    m = build("augment", r)
    k = [int(r * n + 0.5) for n in SIZES]
    assert len(m.labels) == sum(SIZES) + sum(k)
    assert per_class(m, REAL) == SIZES
    assert per_class(m, GENERATED) == k


@pytest.mark.parametrize("mode", ["substitute", "augment", "control"])
def test_no_image_appears_twice(mode):
    for ratio in (0.3, 1.0):
        m = build(mode, ratio)
        assert len(set(m.images.view(-1).tolist())) == len(m.images)  # global ids: no row twice, in any pool
        real_ids = m.images[m.origin == REAL].view(-1)
        assert real_ids.lt(1000).all() and len(real_ids.unique()) == len(real_ids)


def test_split_real_is_stratified_and_disjoint():
    labels = REAL_POOL.labels
    keep, rest = split_real(labels, 0.5, torch.Generator().manual_seed(3))
    assert set(keep.tolist()).isdisjoint(rest.tolist())
    assert sorted(keep.tolist() + rest.tolist()) == list(range(len(labels)))
    assert class_sizes(labels[keep], K) == [max(1, int(0.5 * n)) for n in SIZES]


def test_substitute_and_control_remove_the_same_real_images_and_nest_in_alpha():
    kept = {}
    for mode in ("substitute", "control"):
        for alpha in (0.5, 0.75):
            m = build(mode, alpha)
            kept[mode, alpha] = set(m.index[m.origin == REAL].tolist())
    assert kept["substitute", 0.5] == kept["control", 0.5]  # paired: only the substitutes differ
    assert kept["substitute", 0.75] < kept["substitute", 0.5]  # a larger alpha replaces a superset


def test_another_seed_replaces_other_images():
    a, b = build("substitute", 0.5, seed=0), build("substitute", 0.5, seed=1)
    assert per_class(a, GENERATED) == per_class(b, GENERATED)
    assert set(a.index[a.origin == REAL].tolist()) != set(b.index[b.origin == REAL].tolist())


def test_attributes_follow_their_rows():
    m = build("substitute", 0.5)
    assert torch.equal(m.attrs, m.images.view(-1) % 2)


def test_short_pool_is_a_clear_error():
    small = labelled([1, 1, 1, 1], 9000)
    with pytest.raises(
        ContaminationError, match="generated pool holds 1 images of class 0, the cell needs 5"
    ):
        mix("substitute", 0.5, REAL_POOL, orders(REAL_POOL, 0), small, orders(small, 1))


@pytest.mark.parametrize(
    ("mode", "ratio", "message"),
    [
        ("substitute", -0.1, "alpha must be a number in \\[0, 1\\]"),
        ("substitute", 1.5, "alpha must be"),
        ("control", 2, "alpha must be"),
        ("generations", float("nan"), "alpha must be"),
        ("substitute", True, "alpha must be"),
        ("augment", -1, "r must be a finite number >= 0"),
        ("augment", float("inf"), "r must be"),
        ("nope", 0.5, "unknown contamination mode"),
    ],
)
def test_bad_ratios_are_clear_errors(mode, ratio, message):
    with pytest.raises(ContaminationError, match=message):
        check_ratio(mode, ratio)
    if mode != "nope":
        with pytest.raises(ContaminationError, match=message):
            build(mode, ratio)


def test_plan_orders_cells_and_pool_needs_take_the_largest():
    modes = {"substitute": [0.0, 0.5], "augment": [2.0], "control": [1.0]}
    cells = plan(modes, [0, 1], [{"arch": "mlp", "steps": 5}], None, [])
    assert cells[0] == Cell("reference", "substitute", 0.0, 0)
    assert [c.kind for c in cells].count("baseline") == 2
    assert len(cells) == 1 + 2 + (2 + 1 + 1) * 2
    need = pool_needs(cells, SIZES)
    assert need == {(None, None): [2 * n for n in SIZES]}  # augment r = 2 is the largest generated demand
    own = plan(modes, [0, 1], [], None, [], gen_seed=lambda s: s)  # a generator per replicate: a pool each
    assert pool_needs(own, SIZES) == {(None, 0): [2 * n for n in SIZES], (None, 1): [2 * n for n in SIZES]}
    gens = plan({"generations": [0.5]}, [0], [], 3, [0, 1, 2])
    assert [c.gen_t for c in gens if c.kind == "contaminated"] == [0, 1, 2]
