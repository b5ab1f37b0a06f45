"""Shared fixtures: paths to the real samples, one local Ray per test session for the `ray` tests."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_SAMPLES = ROOT.parent / "shared" / "real_samples"


@pytest.fixture(scope="session")
def real_samples() -> Path:
    if not (REAL_SAMPLES / "nih" / "images").is_dir():
        pytest.skip(f"real samples not found at {REAL_SAMPLES}")
    return REAL_SAMPLES


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) shared by every test marked `ray`. The dashboard runs (on loopback) because Ray
    Train's placement-group cleaner asks its state API whether a controller is alive: without it, the workers'
    CPUs of a sweep trial that Tune stops early are never given back."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level="ERROR",
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": "pipelines.runtime.quiet_worker_logs"},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
