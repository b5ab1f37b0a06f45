"""Ray Data and Ray Train side of the project: dataset layouts, synthetic data, ingest, streaming, training."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cxr-ray")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
