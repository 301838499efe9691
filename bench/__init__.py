"""The project's load generator and benchmark: ``python -m bench --help``."""
