"""remap_core: the REMAP global descriptor and its baselines (PyTorch).

Importing this package is cheap: torch is imported by the submodules that need it.
"""

__version__ = "0.1.0"
