"""The config: its fields and defaults (schema.py), the method table (methods.py), its checks (checks.py)."""
