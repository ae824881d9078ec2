"""A containerd proxy snapshotter: ordinary image layers stacked with overlayfs, as containerd's
own overlay snapshotter does, and ModelPack models mounted lazily in place of their model
image's marker layer, served over containerd's snapshots gRPC API on a unix socket.

- ``filters``, ``mounts``, ``models``: pure logic (containerd's filter syntax, the mount specs
  of a snapshot, the labels and marker that name a model, its model image).
- ``metadata``: the snapshots' state machine and its store (SQLite under the root).
- ``disk``: the snapshot directories and their usage; ``lazy``: the model mounts.
- ``api``: the protobuf messages and gRPC services, compiled from ``proto/`` at import.
- ``server``: the gRPC service; ``mirror``: the registry mirror that answers a model's own
  reference with its model image; ``cri``: the CRI image proxy that keeps kubelet's pull
  credentials for the model mounts; ``stats``: the Prometheus metrics.
"""
