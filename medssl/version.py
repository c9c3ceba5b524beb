"""medssl's version (``pyproject.toml`` says the same; a test checks), importable without the package's API."""

__version__ = "0.1.0"
