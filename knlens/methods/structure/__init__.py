"""Neuron structure beyond single neurons: weight topology, clusters, degenerate components, fact checking."""
