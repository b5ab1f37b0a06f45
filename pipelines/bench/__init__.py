"""Benchmarks of the data path and of training; each prints figures measured side by side in one run."""
