"""Peers: nodes of one cluster serving each other verified pieces from their caches."""
