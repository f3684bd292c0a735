"""The record every corpus reader yields (moekit.data.catalog, moekit.data.parquet)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    text: str
    tag: str          # language, source or play: what reports break routing down by
