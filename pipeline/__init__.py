"""The application: what runs the I-Tuning pipeline's steps by composing the science (ituning/)
and the data's persistence (storage/).

Data steps (pipeline/data.py), the feature cache (features.py), training stages (training.py),
evaluation (evaluation.py) and the model registry (registry.py) as plain functions; MLflow
tracking (tracking.py), the served pyfunc model (captioner_model.py), the captioner's web page
(app.py), reports and the caption gallery, preset lookup (presets.py).

Import rule: pipeline/ may import ituning/ and storage/, never tasks/, flows/, cli/ or prefect, not
even by a module name in a string (the command line, above flows/, launches them).
tests/test_layers.py checks it.
"""
