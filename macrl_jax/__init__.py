"""Self-supervised ViT pre-training (MACRL, MimCo, MAE, MoCo v3) in JAX/Flax.

The subpackages are layers, lowest first: models → config → data → interop → methods → evals → run
(errors.py and sharding.py serve them all). A module imports only its own layer and those below.
"""
