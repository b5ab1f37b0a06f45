"""The ``cxr`` command: one subcommand per stage, each also runnable as ``python -m <module>``.

Subcommands are imported lazily so ``cxr --help`` stays fast and a stage's heavy imports load only when used.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "synth": ("pipelines.synth.__main__", "write synthetic radiographs in the NIH and COVID-19 dataset layouts"),
    "ingest": ("pipelines.ingest", "raw dataset folders -> validated parquet shards per split (Ray Data)"),
    "train": ("pipelines.train", "train the CNN or the ViT with DDP on Ray Train, tracked in MLflow"),
    "evaluate": ("pipelines.evaluate", "CNN, ViT, fused and gated ensemble side by side on the test split"),
    "tune": ("tune.cli", "Ray Tune sweeps: `cxr tune train` (lr, weight decay, dropout), `cxr tune ensemble`"),
    "serve": ("pipelines.serve_cmd", "run the Ray Serve app (CNN, ViT, adaptive ensemble router) until Ctrl-C"),
    "export": ("pipelines.export", "a checkpoint as ONNX (parity-checked against PyTorch, optional int8), in MLflow"),
    "bench": ("pipelines.bench", "benchmarks: `cxr bench data|train|serve|export`"),
    "cluster": ("cluster.local", "a local multi-node Ray cluster with token auth: `cxr cluster up|down|status`"),
}
NOT_SUBMITTABLE = {"cluster", "bench"}  # these act on this machine


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: cxr <stage> [--config ray_config.yaml] [--profile NAME] [--set key=value ...] [options]", ""]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in STAGES.items()]
    lines += ["", "`cxr <stage> --help` lists a stage's options. `cxr <stage> ... --address http://HOST:8265 [--wait]`"]
    lines += ["runs the stage as a Ray job on that cluster (python -m <module> with the same arguments)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"cxr: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if any(arg == "--address" or arg.startswith("--address=") for arg in rest) and stage not in NOT_SUBMITTABLE:
        from cluster.submit import submit_stage

        return submit_stage(stage, STAGES[stage][0], rest)
    module = importlib.import_module(STAGES[stage][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
