"""The benchmark of modelfs against curl, oras, a trivial FUSE filesystem and the local disk."""
