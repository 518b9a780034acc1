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
