"""Models: the shared 2D slice encoder, projection heads and prototypes, the deformable slice transformer.

Pure ``nn.Module``s: no I/O, no devices, no distributed setup (the trainer owns those).
"""
