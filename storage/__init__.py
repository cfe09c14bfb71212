"""Plain-Python storage: downloads, the DuckDB catalog and the HDF5 feature cache."""
