"""One mount's runtime: a reference made into a model (``model``), served over FUSE by the
adapter in ``modelfs.fs`` until unmounted (``session``), or recorded while a load runs against
it (``profiling``, for ``modelfs profile``)."""
