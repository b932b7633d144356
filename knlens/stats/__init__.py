"""Statistics shared by every method and study (one copy each): set similarity, thresholds, tests."""

from knlens.stats.sets import abs_cosine, jaccard_consistency, niu_similarity
from knlens.stats.tests import empirical_floor, floor_note, paired_permutation_test, wilcoxon_floor
from knlens.stats.thresholds import bimodality, otsu_threshold

__all__ = ["abs_cosine", "bimodality", "empirical_floor", "floor_note", "jaccard_consistency", "niu_similarity",
           "otsu_threshold", "paired_permutation_test", "wilcoxon_floor"]
