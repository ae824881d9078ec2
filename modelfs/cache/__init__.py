"""The node's local piece cache (LMDB)."""

from modelfs.cache.store import CacheStats, PieceCache, PutResult

__all__ = ["CacheStats", "PieceCache", "PutResult"]
