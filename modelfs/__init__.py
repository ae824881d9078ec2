"""modelfs: ModelPack OCI artifacts as lazily loaded, read-only directories."""

__version__ = "0.1.0"
