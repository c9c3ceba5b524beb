"""Export of pretrained encoders (MONAI bundles, 2D -> 3D I3D inflation)."""
