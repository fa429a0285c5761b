"""The programs: pre-training (train.py, loop.py), fine-tuning, workdirs, checkpoints, restoring,
writers, step timing and the method comparison."""
