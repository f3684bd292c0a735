"""Real text without a network: the corpus catalog, the BPE tokenizer, packed token streams."""

from moekit.data.catalog import CATALOG, Document, cache_dir, fetch, load_documents

__all__ = ["CATALOG", "Document", "cache_dir", "fetch", "load_documents"]
