"""nad-guard: a trust layer for image classifiers."""
__version__ = "0.1.0"
