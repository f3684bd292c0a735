"""Serving trained models: sampling text (``generate``)."""

from moekit.serve.generate import generate, sample

__all__ = ["generate", "sample"]
