"""The data's persistence: dataset manifests, verified downloads and extraction (with the one
public-host rule for URLs fetched on someone else's behalf), the source
formats (Karpathy splits, Visual Genome, NoCaps), the DuckDB catalog, the HDF5 feature-cache
format, file locks and the synthetic corpus in the real formats.

Import rule: storage/ imports no other folder of the project, and none of torch, torchvision,
transformers, open_clip, prefect or mlflow, so any tool can import it cheaply (DuckDB, h5py, numpy,
PIL and httpx are fine). tests/test_layers.py checks it.
"""
