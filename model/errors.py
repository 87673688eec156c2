"""The error every decoder raises for an input that cannot become a model tensor.

A module of its own: ``model.preprocessing`` (JPEG/PNG) and ``model.dicom`` both raise it, and
``preprocessing`` calls into ``dicom``, so neither can own it without an import cycle.
"""

from __future__ import annotations


class InvalidImageError(ValueError):
    """An input that cannot be turned into a model tensor. ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
