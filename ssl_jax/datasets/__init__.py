"""TFDS builders for datasets that ssl_jax reads from local files."""
