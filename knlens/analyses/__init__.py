"""One module per research question, built on knlens' methods (attribution, patching, interventions).

* :mod:`knlens.analyses.query_localization` — query localization (Chen et al., ICLR 2025): consistency of
  knowledge neurons across paraphrases, query-KN mapping, consistency-aware selection, attention versus
  MLP at the neuron level, knowledge-synapse scaling, entity versus relation tracing.
"""

from __future__ import annotations

from .query_localization import (STATIC_THRESHOLD, AttentionPatch, ConsistencyStudy, EntityRelation,
                                 FactConsistency, attended_positions, attention_patch, compare_selections,
                                 consistency_aware_neurons, consistency_aware_scores, consistency_study,
                                 entity_vs_relation, fact_consistency, jaccard_consistency, mapping_summary,
                                 niu_similarity, otsu_threshold, per_prompt_neurons, query_kn_mapping,
                                 scale_attention, synapse_scaling, welch_test)

__all__ = [
    "STATIC_THRESHOLD", "AttentionPatch", "ConsistencyStudy", "EntityRelation", "FactConsistency",
    "attended_positions", "attention_patch", "compare_selections", "consistency_aware_neurons",
    "consistency_aware_scores", "consistency_study", "entity_vs_relation", "fact_consistency",
    "jaccard_consistency", "mapping_summary", "niu_similarity", "otsu_threshold", "per_prompt_neurons",
    "query_kn_mapping", "scale_attention", "synapse_scaling", "welch_test",
]
