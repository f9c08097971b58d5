"""What every command uses at run time and no stage owns: the console (logging, tables), safe file writes,
the compute device, and decoding an image file. Imports no stage (``cache``, ``extract``, ... build on it)."""
