"""Experiment configs: one `get_config(arg)` file per method (see common.py)."""
