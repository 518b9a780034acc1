"""Figure labels name the feature space of precision/recall and the image metrics (report.metric_label)."""

from __future__ import annotations

from simulator.report import metric_label


def test_each_precision_recall_column_says_its_feature_space():
    image = {"eval": {"metrics": ["fid", "bpd"], "options": {"extractor": "inception", "prc": True}}}
    digits = {"eval": {"metrics": ["fid"], "options": {"extractor": "tiny"}}}
    default = {"eval": {"metrics": ["fid"]}}  # the fid metric's default extractor is inception
    vectors = {"eval": {"metrics": ["knn_pr", "frechet"]}}
    for column in ("precision", "recall", "fid", "kid_mean"):
        assert metric_label(column, image) == f"{column} (Inception pool3)"
        assert metric_label(column, default) == f"{column} (Inception pool3)"
        assert metric_label(column, digits) == f"{column} (tiny-CNN features)"
    assert metric_label("precision", vectors) == "precision (raw vectors)"
    assert metric_label("recall", vectors) == "recall (raw vectors)"
    assert metric_label("frechet", vectors) == "frechet" and metric_label("bpd", image) == "bpd"
    assert metric_label("precision", {}) == "precision"  # a run without a config.yaml


def test_regime_labels_tell_the_mitigations_apart():
    """Runs that differ only in a mitigation (same policy) are grouped apart by the report (their configs
    differ), and their labels say how, so a table or legend never shows two rows of the same name."""
    from simulator.report import regime_label

    base = {"policy": {"name": "replace"}, "model": {"family": "flow_nsf"}}
    arms = [
        {},
        {"sample": {"correction": "truth", "correction_strength": 0.25}},
        {"sample": {"correction": "kmeans"}},
        {"sample": {"label_noise": 0.3, "verifier": "oracle", "curation_k": 4}},
        {"sample": {"curation_k": 4}},
        {"sample": {"selection": "greedy", "selection_k": 2}},
        {"mitigation": {"neon": {"w": 1.0}, "sims": {"omega": None}}},
        {"mitigation": {"sims": {"omega": 0.5}}},
    ]
    labels = [regime_label({**base, **arm}) for arm in arms]
    assert labels[0] == "replace (flow_nsf)"
    assert len(set(labels)) == len(labels)
    assert labels[1] == "replace + correction=truth γ=0.25 (flow_nsf)"
    assert labels[6] == "replace + Neon w=1 (flow_nsf)" and labels[7] == "replace + SIMS ω=0.5 (flow_nsf)"


def test_a_mitigation_arm_is_judged_against_the_floor_of_its_sweep():
    """The report pairs a run with the real-only run of the same sweep whose config differs only in the
    regime: the policy and the mitigations (mitigation.*, the sample keys of REGIME_SAMPLE_KEYS)."""
    from simulator.report import _policyless

    floor = {"policy": {"name": "mix", "lam": 0.0}, "seed": 0, "sample": {"n": 2000, "correction": None},
             "mitigation": {"neon": {"w": None, "n_self": 2000}}, "model": {"family": "nsf"}}  # fmt: skip
    neon = {**floor, "policy": {"name": "replace"}, "mitigation": {"neon": {"w": 0.5, "n_self": 2000}}}
    corrected = {**floor, "policy": {"name": "replace"}, "sample": {"n": 2000, "correction": "truth"}}
    other_data = {**floor, "sample": {"n": 1000, "correction": None}}
    assert _policyless(neon) == _policyless(floor) == _policyless(corrected)
    assert _policyless(other_data) != _policyless(floor)  # not a regime key: another setting
