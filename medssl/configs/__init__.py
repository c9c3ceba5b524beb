"""The shipped Hydra configs (``pretrain.yaml`` and its groups, ``demo.yaml``, ``finetune/``, ``evaluate/``).

A package so that an installed medssl composes them from itself (``pkg://medssl.configs``); the repository's
top-level ``configs/`` is a link to this folder. A user's own folder (``--config-dir`` or ``$MEDSSL_CONFIG_DIR``)
adds to these as Hydra's ``--config-dir`` does: new group options and top-level configs.
"""
