"""One Serve app for the modules of this folder (package scope), on the session's local Ray: real HTTP on
127.0.0.1, the session's tiny untrained checkpoints (the CNN with the metadata fusion head, as the demo profile
trains it), deployed the way `serve deploy` does it: ``serve/serve_config.yaml`` with its ``args`` pointed at them,
applied through the Serve controller, with an out-of-distribution check fitted on the tiny shards
(``write_ood_check``).

The modules run in file-name order against the same app: disconnect, endpoints, endpoints_metadata, errors, explain,
then faults (the live reconfigure, the overload burst and the replica kill), which must come last.
"""

from __future__ import annotations

import pytest

from tests.helpers import (
    APP_MAX_UPLOAD_MB,
    APP_ROUTER_QUEUE,
    CONFIG,
    KEY_ENV,
    deploy_schema,
    free_port,
    tiny_checkpoint,
    wait_healthy,
)


@pytest.fixture(scope="package")
def shards_config(tiny_shards):
    """The config of the session's tiny shards, for `--try` (which reads the test split's original files)."""
    from pipelines.config import load_config

    return load_config(None, sets=["data.storage_size=32", f"data.shards_dir={tiny_shards}"])


@pytest.fixture(scope="package")
def served_checkpoints(tmp_path_factory, tiny_checkpoints):
    """The session's checkpoints with the CNN swapped for one with the metadata fusion head (seeded), so every test
    here runs against a fusion model and the metadata tests see its answers move with age, sex and view."""
    import torch

    torch.manual_seed(0)
    cnn = tiny_checkpoint(tmp_path_factory.mktemp("fusion"), "cnn", "test_efficientnet", metadata=True)
    return {**tiny_checkpoints, "cnn": cnn}


def write_ood_check(cfg, run_dir):
    """Stage B's out-of-distribution check, fitted on the tiny shards, in the run's ensemble.yaml (the gate as the
    sets give it), so the app refuses what does not look like them, as a tuned deployment does."""
    from pipelines.artifacts import write_settings
    from tune.ood_fit import fit_ood_check

    record = fit_ood_check(cfg, run_dir)
    write_settings(run_dir / "ensemble.yaml", 0.4, 0.85, ood=record)


@pytest.fixture(scope="package")
def served(ray_session, tmp_path_factory, shards_config, served_checkpoints):
    from ray import serve
    from ray.serve.context import _get_global_client

    folder = tmp_path_factory.mktemp("serve")
    port = free_port()
    sets = [
        f"train.run_dir={folder / 'run'}",
        f"serve.api_key_env={KEY_ENV}",
        f"serve.max_upload_mb={APP_MAX_UPLOAD_MB}",
        "serve.max_pixels=4000000",
        "serve.max_batch_images=4",
        "serve.request_timeout_s=20",
        f"serve.router={{num_cpus: 0.4, max_ongoing_requests: 4, max_queued_requests: {APP_ROUTER_QUEUE}}}",
        "serve.cnn={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.4, num_gpus: 0}",
        "serve.vit={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.4, num_gpus: 0}",
        "ensemble.threshold=0.85",
        "ensemble.w_cnn=0.4",
    ]
    args = {"config": str(CONFIG), "sets": sets, **{k: str(v) for k, v in served_checkpoints.items()}}
    write_ood_check(shards_config, folder / "run")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = _get_global_client()
    client.deploy_apps(deploy_schema(args, port), _blocking=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    yield {"url": url, "client": client, "args": args, "port": port, "checkpoints": served_checkpoints}
    serve.shutdown()
