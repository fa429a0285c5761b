"""The pre-training methods: their networks, losses, optimizer and jitted step, built in one place (build.py)."""
