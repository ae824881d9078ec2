"""Where blob bytes come from: the ``BlobSource`` interface (``interface``) and its two kinds, a
registry (``registry``: HTTP, auth, retries; ``rangeget``: the lean range GET; ``credentials``:
docker logins; ``referrers``: artifacts attached to a manifest) and an OCI image layout on disk
(``layout``); the pool of piece buffers bodies are received into (``buffers``) and a mount's
counters of what came from where (``stats``)."""
