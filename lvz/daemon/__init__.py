"""The lvz daemon: the VM model (pure) and the trio server around it (all server-side I/O)."""
