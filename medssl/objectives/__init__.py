"""Self-supervised objectives: each a pure function or ``nn.Module`` returning its loss and a few metrics.

Every loss cites its paper and is tested against a plainly written reference in ``tests/``.
"""
