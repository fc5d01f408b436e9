"""Temporary."""

from lmtrain.config import validate  # noqa: F401
