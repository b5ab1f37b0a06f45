"""Benchmarks of the Serve app: throughput and latency per mode, Serve's own floor, the result cache, ONNX backends."""
