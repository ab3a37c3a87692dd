"""Model I/O: load safely, check external data, write atomically, keep training_info, progress."""
