"""`cxr serve`: run the Serve application (CNN, ViT, EnsembleRouter) on a local or joined Ray, until Ctrl-C.

The same app `serve run serve/serve_config.yaml` deploys; this command adds checkpoint and ensemble overrides and
prints the URL with a first request to try.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import requests

from pipelines.cli import run_module
from pipelines.config import Config
from pipelines.runtime import ensure_ray
from serve.smoke import try_images

log = logging.getLogger(__name__)
APP_NAME = "cxr"


def wait_ready(url: str, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/v1/health", timeout=5).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cnn", type=Path, help="CNN checkpoint dir (default: serve.cnn.* or the last training)")
    parser.add_argument("--vit", type=Path, help="ViT checkpoint dir (default: serve.vit.* or the last training)")
    parser.add_argument(
        "--ensemble", type=Path, help="ensemble.yaml (default: <train.run_dir>/ensemble.yaml or config)"
    )
    parser.add_argument(
        "--no-block",
        action="store_true",
        help="deploy, wait until ready and return: for a cluster (cluster.address); a local Ray ends with this process",
    )
    parser.add_argument(
        "--try", dest="try_images", type=int, default=0, metavar="N",
        help="once ready, send N test-split images over HTTP and print the answers (the demo's last step)",
    )  # fmt: skip


def run(args: argparse.Namespace, cfg: Config) -> int:
    from ray import serve

    from serve.app import build_app, serve_logging, use_grpc_in_local_proxies

    verbose = getattr(args, "verbose", False)
    if not verbose:  # importing ray.serve set its driver-side logger to INFO ("Started Serve", "Application is ready")
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    app = build_app(cfg, args.cnn, args.vit, args.ensemble)
    use_grpc_in_local_proxies(cfg)
    ensure_ray(cfg)
    serve.start(
        http_options={"host": cfg.serve.host, "port": cfg.serve.port},
        proxy_location=cfg.serve.proxy_location,
        logging_config=serve_logging(cfg.serve.access_log, verbose),  # the controller's and the proxies' logs
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    if not wait_ready(url):
        print(f"cxr serve: {url}/v1/health did not report ready; see the Serve logs", file=sys.stderr)
        return 1
    key = f' -H "X-API-Key: ${cfg.serve.api_key_env}"' if cfg.serve.api_key_env else ""
    print(f"serving at {url}  (web page: {url}/)")
    print("API: /v1/predict, /v1/predict/batch, /v1/explain, /v1/health, /v1/model")
    print(f"try: curl{key} --data-binary @image.png '{url}/v1/predict?mode=adaptive'")
    if args.try_images:
        api_key = os.environ.get(cfg.serve.api_key_env) if cfg.serve.api_key_env else None
        if try_images(url, cfg, args.try_images, api_key):
            return 1
    if args.no_block:
        return 0
    print("Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down Serve")
        serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr serve`; also `python -m serve.cli` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
