"""Prefect tasks: one @task per application function (pipeline/), passing paths, ids and names,
plus the cache policies that decide when a task's earlier result is reused.

Import rule: tasks/ imports pipeline/, ituning/ and storage/, never flows/ or cli/. tests/test_layers.py
checks it.
"""
