"""The networks as flax modules taking plain values: the ViT (vit.py) and MoCo v3's heads (heads.py)."""
