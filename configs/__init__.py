"""ml_collections `get_config()` files, one per scale. Installed as the package `sajax.configs` so that the CLIs
find their embedded default; pass any of them, or your own copy, with `--config path/to/file.py`."""
