"""The networks as flax modules taking plain values: the ViT (vit.py), the decoders that complete its
visible tokens (decoders.py) and MoCo v3's heads (heads.py)."""
