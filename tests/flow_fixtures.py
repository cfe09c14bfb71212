"""A full-pipeline run small enough for the test suite (a few minutes on 2 cores)."""

SMALL_RUN = {"config": "demo", "synthetic_images": 30, "shard_size": 64, "device": "cpu", "gallery_size": 4,
             "backbone_steps": 30}
