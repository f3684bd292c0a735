"""EfficientScale: models made from smaller or dense ones (upcycling so far)."""

from moekit.scale.upcycle import upcycle

__all__ = ["upcycle"]
