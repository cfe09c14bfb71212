"""The start-up entry an environment's ituning-import-hook.pth names (pipeline/torchvision_hook.py
writes that file): importing it puts the torchvision import finder in place (ituning/compat.py)."""

from ituning.compat import install_finder  # noqa: F401  (the .pth line calls it)
