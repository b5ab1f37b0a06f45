"""The ``cxr`` command: one table of every command, each also runnable as ``python -m <module>``.

A command's module defines ``add_arguments(parser)`` (its own options) and ``run(args, cfg) -> int`` (the work,
given the loaded config). This module builds every parser with the shared options (``--config``, ``--profile``,
``--set``, ``-v``; ``--address URL [--wait]`` where the command can run as a Ray job), loads the config, and turns
the project's errors (``models.errors.CxrError``: a bad config value, a missing shard folder, checkpoint or
pointer file, ...) into one line ``cxr <command>: error: ...`` and exit status 2. Modules are imported lazily, so
``cxr --help`` stays fast and a command's heavy imports load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from types import ModuleType

from models.errors import CxrError
from pipelines.config import DEFAULT_CONFIG_PATH, PROJECT_ROOT_ENV, Config, load_config

# Libraries whose INFO lines are routine chatter on a console (their warnings and errors still show).
NOISY_LOGGERS = ("ray", "alembic", "mlflow", "urllib3", "filelock", "matplotlib", "PIL", "timm")
# Errors a user fixes by changing an argument, a config value or a file: reported in one line, no traceback.
USER_ERRORS = (CxrError, FileExistsError)


@dataclass(frozen=True)
class Command:
    name: str  # what follows `cxr`, e.g. "train" or "tune ensemble"
    module: str  # where add_arguments and the runner live; `python -m <module>` runs the command too
    help: str  # one line for `cxr --help`
    runner: str = "run"  # the module's function (args, cfg) -> int | None
    submittable: bool = True  # `--address URL` runs it as a Ray job on that cluster
    arguments: str | None = "add_arguments"  # the module's function (parser) -> None adding the command's options


COMMANDS: tuple[Command, ...] = (
    Command("synth", "pipelines.data.synth.__main__", "synthetic radiographs in the three datasets' layouts"),
    Command("ingest", "pipelines.data.ingest", "raw dataset folders -> parquet shards per split (Ray tasks)"),
    Command("train", "pipelines.train.driver", "train the CNN or the ViT with DDP on Ray Train, tracked in MLflow"),
    Command("evaluate", "pipelines.evaluate.evaluation", "CNN, ViT, fused and gated ensemble on the test split"),
    Command("tune train", "tune.train_sweep", "Ray Tune stage A: learning rate, weight decay, dropout"),
    Command("tune ensemble", "tune.ensemble_sweep", "Ray Tune stage B: fusion weight and gate threshold"),
    Command("export", "pipelines.export", "a checkpoint as ONNX (parity-checked, optional int8), logged to MLflow"),
    Command("serve", "serve.cli", "run the Ray Serve app (CNN, ViT, adaptive ensemble router) until Ctrl-C"),
    Command("bench data", "pipelines.bench.data", "images/s into training: one process vs Ray Data", submittable=False),
    Command("bench train", "pipelines.bench.train", "training images/s with 1 and 2 DDP workers", submittable=False),
    Command("bench scale", "pipelines.bench.scale", "ingest and one epoch at 2k, 20k, 133k images", submittable=False),
    Command("bench serve", "serve.bench.serving", "Serve over HTTP vs direct calls, per mode", submittable=False),
    Command("bench ood", "pipelines.bench.ood", "the OOD check vs CNN-feature Mahalanobis", submittable=False),
    Command("bench cache", "serve.bench.result_cache", "the result cache off vs on with repeats", submittable=False),
    Command("bench export", "serve.bench.export", "PyTorch vs ONNX Runtime fp32/int8, and Serve", submittable=False),
    Command("cluster up", "cluster.local", "start a local multi-node Ray cluster with token auth", "run_up", False),
    Command("cluster down", "cluster.local", "stop the cluster `cxr cluster up` started", "run_down", False, None),
    Command("cluster status", "cluster.local", "the cluster's nodes and how to connect", "run_status", False, None),
)
BY_NAME = {command.name: command for command in COMMANDS}


def usage() -> str:
    width = max(len(command.name) for command in COMMANDS)
    lines = ["usage: cxr <command> [--config ray_config.yaml] [--profile NAME] [--set key=value ...] [options]", ""]
    lines += [f"  {command.name:<{width}}  {command.help}" for command in COMMANDS]
    lines += ["", "`cxr <command> --help` lists its options; `--address http://HOST:8265 [--wait]` runs a stage as a"]
    lines += ["Ray job on that cluster (python -m <module> with the same arguments)."]
    return "\n".join(lines)


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="YAML config (default: %(default)s)")
    group.add_argument("--profile", default=None, help="named profile from the config, e.g. demo")
    group.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.lr=3e-4 (repeatable)",
    )
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def configure_logging(verbose: bool = False) -> None:
    """One console format; our loggers at INFO (DEBUG with ``-v``), other libraries' routine INFO lines hidden."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:  # MLflow resets its loggers to this level when imported: later here, or in a Ray worker
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config a command runs with (logging configured first, so config errors print cleanly)."""
    configure_logging(verbose=getattr(args, "verbose", False))
    cfg = load_config(args.config, args.profile, args.sets)
    # a job of `cxr <stage> --address` runs in Ray's copy of the code: relative paths mean the submitter's checkout
    return cfg.with_absolute_paths() if os.environ.get(PROJECT_ROOT_ENV) else cfg


def build_parser(command: Command, module: ModuleType) -> argparse.ArgumentParser:
    doc = (module.__doc__ or command.help).strip().split("\n\n")[0]
    parser = argparse.ArgumentParser(prog=f"cxr {command.name}", description=doc)
    if command.arguments:
        getattr(module, command.arguments)(parser)
    add_config_args(parser)
    if command.submittable:
        group = parser.add_argument_group("Ray job")
        group.add_argument("--address", metavar="URL", help="run as a Ray job on this cluster's dashboard address")
        group.add_argument("--wait", action="store_true", help="with --address: stream the job's log until it ends")
    return parser


def run_command(command: Command, argv: list[str], module: ModuleType | None = None) -> int:
    """Parse ``argv`` for ``command``, then submit it as a job or run it here; project errors -> exit 2."""
    module = module or importlib.import_module(command.module)
    args = build_parser(command, module).parse_args(argv)
    args.command_line = shlex.join(["cxr", *command.name.split(), *argv])  # benchmarks print what made their figures
    if getattr(args, "address", None):
        from cluster.submit import submit_stage

        return submit_stage(command.name, command.module, argv)
    try:
        cfg = config_from_args(args)
        return int(getattr(module, command.runner)(args, cfg) or 0)
    except USER_ERRORS as err:
        print(f"cxr {command.name}: error: {err}", file=sys.stderr)
        return 2


def run_module(module: ModuleType, argv: list[str] | None = None) -> int:
    """``main`` of a command module (``python -m <module>``, e.g. under ``ray job submit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = module.__spec__.name if module.__spec__ else module.__name__
    commands = [command for command in COMMANDS if command.module == name]
    if len(commands) > 1:  # one module, several commands (cluster up|down|status): the first word picks
        picked = [c for c in commands if argv[:1] == [c.name.split()[-1]]]
        if not picked:
            choices = "|".join(c.name.split()[-1] for c in commands)
            print(f"usage: python -m {name} {{{choices}}} [options]", file=sys.stderr)
            return 2
        commands, argv = picked, argv[1:]
    return run_command(commands[0], argv, module)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    for words in (2, 1):
        command = BY_NAME.get(" ".join(argv[:words]))
        if command is not None:
            return run_command(command, argv[words:])
    group = [command for command in COMMANDS if command.name.startswith(f"{argv[0]} ")]
    if group:  # `cxr tune` alone or with an unknown second word
        width = max(len(command.name) for command in group)
        lines = [f"usage: cxr {argv[0]} {{{','.join(c.name.split()[1] for c in group)}}} [options]", ""]
        print("\n".join(lines + [f"  {c.name:<{width}}  {c.help}" for c in group]), file=sys.stderr)
        return 0 if argv[1:2] in (["-h"], ["--help"]) else 2
    print(f"cxr: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
