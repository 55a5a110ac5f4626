"""Inference: model bundles, the per-case predictor and batch folder inference.

Never imports engine/ or training loaders: preprocessing comes from the bundle's plan through the same
deterministic transforms validation uses (:func:`medsup.data.transforms.eval_transforms`).
"""
