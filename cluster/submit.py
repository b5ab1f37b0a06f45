"""`cxr <stage> ... --address URL`: run a stage as a Ray job on a cluster instead of in this process.

The job is ``python -m <stage module> <the same arguments>`` with this checkout as its working directory (without
.venv, run outputs and data, which the cluster must not receive). It prints the job id and how to follow it, or
with ``--wait`` streams the job's log and returns its outcome.

On a cluster on this machine (a loopback address, e.g. `cxr cluster up`) the job also gets ``CXR_PROJECT_ROOT`` =
this checkout, so relative paths of the config (``runs/...``) mean the same files as here; and the token of
`cxr cluster up` is used when the environment names none. On a remote cluster, set the config's data and run
directories to storage the cluster's nodes share.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path
from urllib.parse import urlparse

from pipelines.config import DEFAULT_CONFIG_PATH, PROJECT_ROOT_ENV, load_config

# Never uploaded with the working directory: environments, outputs, datasets, VCS data.
EXCLUDES = [".venv/", "runs/", "mlruns/", "data/", ".git/", "*.egg-info/", "__pycache__/", ".pytest_cache/"]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def split_submit_args(argv: list[str]) -> tuple[str | None, bool, list[str]]:
    """(address, wait, the stage's own arguments) from a stage's argv."""
    address, wait, rest = None, False, []
    items = iter(argv)
    for item in items:
        if item == "--address":
            address = next(items, None)
            if address is None:
                raise SystemExit("cxr: --address needs a value, e.g. http://127.0.0.1:8265")
        elif item.startswith("--address="):
            address = item.split("=", 1)[1]
        elif item == "--wait":
            wait = True
        else:
            rest.append(item)
    return address, wait, rest


def is_local(address: str) -> bool:
    return (urlparse(address if "://" in address else f"http://{address}").hostname or "") in LOOPBACK_HOSTS


def use_local_cluster_token(argv: list[str]) -> None:
    """Without a token in the environment, take the one `cxr cluster up` wrote for the configured state dir."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    config, profile = str(DEFAULT_CONFIG_PATH), None
    for flag, value in zip(argv, argv[1:], strict=False):
        config = value if flag == "--config" else config
        profile = value if flag == "--profile" else profile
    token = load_config(config, profile, []).cluster.local.state_dir.resolve() / "auth_token"
    if token.is_file():
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})


def submit_stage(stage: str, module: str, argv: list[str]) -> int:
    address, wait, rest = split_submit_args(argv)
    if not Path("pyproject.toml").is_file() or not Path("pipelines").is_dir():
        print("cxr: submit from the repository root (it is the job's working directory)", file=sys.stderr)
        return 2
    env_vars = {}
    if is_local(address):
        use_local_cluster_token(rest)
        env_vars[PROJECT_ROOT_ENV] = str(Path.cwd())
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = shlex.join(["python", "-m", module.removesuffix(".__main__"), *rest])
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": ".", "excludes": EXCLUDES, "env_vars": env_vars},
        metadata={"stage": stage},
    )
    print(f"submitted job {job_id}: {entrypoint}")
    print(f"follow: ray job logs --address {address} -f {job_id}   (dashboard: {address} -> Jobs)")
    if not wait:
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1
