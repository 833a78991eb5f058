"""The package version, in one place: pyproject.toml reads it, and output files record it."""

__version__ = "0.1.0"
