"""The `ituning` command line, the top layer: one module per group of commands (training.py,
evaluation.py, pipeline.py, ...), the dispatcher (main.py, the `ituning` script's entry point),
how a command reports a failure (errors.py) and the launcher of the local servers (services.py).

It may import every other project folder and nothing imports it (tests/test_layers.py checks it).
Heavy libraries are imported inside the commands that use them, so `ituning --help` starts fast.
"""
