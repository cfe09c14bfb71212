"""The application: what runs the I-Tuning pipeline's steps by composing the science (ituning/)
and the data's persistence (storage/).

Data steps (pipeline/data.py), the feature cache (features.py), training stages (training.py),
evaluation (evaluation.py) and the model registry (registry.py) as plain functions; MLflow
tracking (tracking.py), the served pyfunc model (captioner_model.py), the local services
(services.py), reports and the caption gallery, preset lookup (presets.py) and the `ituning`
command line (cli.py, a dispatcher over cli_*.py).

Import rule: pipeline/ may import ituning/ and storage/, never tasks/ or flows/, and never prefect:
the `pipeline` and `demo` commands load the flow by its entry point. tests/test_layers.py checks it.
"""
