"""Neuron structure beyond single top-IG neurons: weight topology, clusters, degenerate components, fact
checking; query-relevant neurons (QRNCA) and the two-stage filter."""
