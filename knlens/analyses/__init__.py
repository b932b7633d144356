"""One module per research question, built on knlens' methods (attribution, patching, interventions).

* :mod:`knlens.analyses.consistency` — consistency of knowledge neurons across paraphrases: per-fact
  scores, the share of inconsistent facts, within- versus between-fact similarity, bimodality;
* :mod:`knlens.analyses.query_localization` — query localization (Chen et al., ICLR 2025): query-KN
  mapping, consistency-aware selection, attention versus MLP at the neuron level, knowledge-synapse
  scaling, entity versus relation tracing;
* :mod:`knlens.analyses.stats` — the statistics they share (Jaccard, Niu similarity, Otsu's threshold,
  a paired permutation test, Silverman's bimodality test).
"""

from __future__ import annotations

from .consistency import (STATIC_THRESHOLD, ConsistencyStudy, FactConsistency, consistency_study,
                          fact_consistency, per_prompt_neurons)
from .query_localization import (AttentionPatch, EntityRelation, attended_positions, attention_patch,
                                 compare_selections, consistency_aware_neurons, consistency_aware_scores,
                                 entity_vs_relation, equal_size_selections, mapping_summary, mapping_tests,
                                 query_kn_mapping, scale_attention, synapse_scaling)
from .stats import (InsufficientDataError, abs_cosine, bimodality, jaccard_consistency, niu_similarity,
                    otsu_threshold, paired_permutation_test)

__all__ = [
    "STATIC_THRESHOLD", "ConsistencyStudy", "FactConsistency", "consistency_study", "fact_consistency",
    "per_prompt_neurons", "AttentionPatch", "EntityRelation", "attended_positions", "attention_patch",
    "compare_selections", "consistency_aware_neurons", "consistency_aware_scores", "entity_vs_relation",
    "equal_size_selections", "mapping_summary", "mapping_tests", "query_kn_mapping", "scale_attention",
    "synapse_scaling", "InsufficientDataError", "abs_cosine", "bimodality", "jaccard_consistency",
    "niu_similarity", "otsu_threshold", "paired_permutation_test",
]
