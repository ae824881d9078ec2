"""The cluster scheduler: who holds which piece, who should serve it, who goes to the registry."""
