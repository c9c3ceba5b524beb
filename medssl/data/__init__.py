"""Data layer: manifests, readers, preprocessing, cache, sampling and datasets.

Nothing here imports training code.
"""
