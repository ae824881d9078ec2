"""The node's local piece cache (LMDB)."""

from modelfs.cache.store import CacheStats, PieceCache, PieceWrite, PutResult, piece_checksum

__all__ = ["CacheStats", "PieceCache", "PieceWrite", "PutResult", "piece_checksum"]
