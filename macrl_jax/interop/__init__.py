"""PyTorch interop: timm/MAE/MoCo v3 layouts and the files that hold them (torch only in torch_files.py)."""
