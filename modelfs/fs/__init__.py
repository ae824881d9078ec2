"""The filesystem: the file tree a manifest describes, and the FUSE operations that serve it."""
