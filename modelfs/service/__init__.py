"""The node service: preheat, cache operations, the daemon supervising mounts."""
