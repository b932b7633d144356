"""Neuron structure beyond single top-IG neurons: query-relevant neurons (QRNCA) and the two-stage filter."""
