"""A containerd proxy snapshotter: ordinary image layers stacked with overlayfs, as containerd's
own overlay snapshotter does, served over containerd's snapshots gRPC API on a unix socket.

- ``labels``, ``filters``, ``mounts``: pure logic (the labels containerd passes, its filter
  syntax, the mount specs of a snapshot).
- ``metadata``: the snapshots' state machine and its store (SQLite under the root).
- ``api``: the protobuf messages and gRPC service, compiled from ``proto/`` at import.
- ``server``: the gRPC service over the metadata and the snapshot directories.
"""
