"""Downstream evaluation of pretrained encoders: frozen-feature probes (linear, kNN) and classification metrics."""
