"""`nucleus data stats` charts: every histogram bin has its own label, and the tier chart says which end is best."""

import numpy as np

from nucleus_image.data.curate.stats import _histogram, _tier_label


def test_bins_get_distinct_labels_even_for_close_values():
    values = 128.0 + np.linspace(0.0, 0.4, 50)  # 50 distinct sizes within half a pixel
    labels, counts = _histogram(values, 20)
    assert len(labels) == 20 and len(set(labels)) == 20 and sum(counts) == 50
    assert labels[0].startswith("128.0") and "-" in labels[0]


def test_few_distinct_values_get_one_label_each():
    labels, counts = _histogram(np.array([64.0, 64.0, 128.0, 96.0]), 20)
    assert labels == ["64", "96", "128"] and counts == [2, 1, 1]


def test_tier_labels_name_the_best_and_lowest():
    assert [_tier_label(f"A{t}") for t in range(1, 6)] == ["A1 (lowest)", "A2", "A3", "A4", "A5 (best)"]
