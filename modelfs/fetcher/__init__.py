"""Getting bytes: the sources of blobs (a registry, an OCI layout) and the piece fetcher."""
