"""The Ray Data and Ray Train side of the project and what every stage shares.

Rooms: ``data/`` (layouts, synthetic data, ingest, transforms, shards, streaming), ``train/`` (Ray Train driver,
worker loop, steps, MLflow tracking), ``evaluate/`` (test-split report), ``bench/`` (data and training benchmarks),
``export.py`` (``cxr export``). At the root: ``config/`` (the typed config tree), ``cli.py`` (the one command table),
``runtime.py`` (joining or starting Ray) and ``artifacts.py`` (which checkpoint, export and ensemble.yaml is the
latest).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cxr-ray")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
