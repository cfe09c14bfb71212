"""Prefect tasks: thin wrappers over one plain function each, passing paths, ids and names."""
