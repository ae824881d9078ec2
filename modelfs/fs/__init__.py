"""The FUSE adapter: the operations that serve a ``Tree`` read-only, each read through the
``OpenFile`` a mount gives it; no fetching, caching or process logic of its own."""
