"""The cluster files under ``cluster/``: the launcher YAML, the KubeRay manifests, the image and the Prometheus config.

Nothing here starts Ray or talks to a cloud or Kubernetes. Each file is parsed and checked against what it must
agree with elsewhere in the repository, so that none of them can drift silently: the pins in ``pyproject.toml``,
the Serve app in ``serve/serve_config.yaml``, the stage modules of ``pipelines/cli.py``, the image built by
``cluster/Dockerfile``, and the discovery file that Ray's own Prometheus config reads.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.cli import COMMANDS
from tests.helpers import ROOT

CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "cluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
STORAGE = CLUSTER / "kuberay" / "storage.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
PROMETHEUS = CLUSTER / "monitoring" / "prometheus.yml"
README = CLUSTER / "README.md"
YAML_FILES = [LAUNCHER, RAYJOB, RAYSERVICE, STORAGE, PROMETHEUS]
KUBERAY = {"RayJob": (RAYJOB, "rayClusterSpec"), "RayService": (RAYSERVICE, "rayClusterConfig")}
DISCOVERY_FILE = "/tmp/ray/prom_metrics_service_discovery.json"
GPU = "nvidia.com/gpu"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pin(name: str) -> str:
    """The exact version ``pyproject.toml`` pins for ``name`` (with or without extras, e.g. ``ray[serve]==X``)."""
    match = re.search(rf'"{re.escape(name)}(?:\[[^\]]*\])?==([^"\s;]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, f"pyproject.toml has no exact pin for {name}"
    return match.group(1)


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml has no project version"
    return match.group(1)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def docker_arg(instruction: str) -> str:
    values = [args for name, args in dockerfile() if name == instruction]
    assert len(values) == 1, f"expected one {instruction} in the Dockerfile, got {values}"
    return values[0]


def cluster_spec(kind: str) -> dict:
    path, key = KUBERAY[kind]
    return load(path)["spec"][key]


def pod_templates(spec: dict) -> dict[str, dict]:
    """Pod spec per group: ``head`` and each worker group's name."""
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({group["groupName"]: group["template"]["spec"] for group in spec["workerGroupSpecs"]})
    return pods


def ray_container(pod: dict) -> dict:
    return pod["containers"][0]  # KubeRay runs Ray in the first container of each pod


def resources(group: dict) -> dict:
    """requests and limits of the Ray container of a head or worker group."""
    return ray_container(group["template"]["spec"])["resources"]


def discovery_files(prometheus_config: dict) -> list[str]:
    jobs = prometheus_config["scrape_configs"]
    return [file for job in jobs for sd in job.get("file_sd_configs", []) for file in sd["files"]]


def module_origin(module: str) -> Path:
    """The file ``python -m module`` runs, which must belong to this repository."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"no module {module}"
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        spec = importlib.util.find_spec(f"{module}.__main__")
        assert spec is not None, f"package {module} has no __main__"
    origin = Path(spec.origin).resolve()
    assert origin.is_relative_to(ROOT), f"{module} resolves to {origin}, outside the repository"
    return origin


# ------------------------------------------------------------------------------------------------- all files


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_yaml_is_one_commented_document(path):
    # one document each: every shipped YAML must load with a plain yaml.safe_load (tests/test_config.py)
    assert path.read_text().startswith("#"), f"{path.name} should open with a comment saying what it is"
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 1 and isinstance(documents[0], dict)


def test_readme_names_every_cluster_file_and_the_commands():
    text = README.read_text()
    for path in [*YAML_FILES, DOCKERFILE]:
        assert str(path.relative_to(ROOT)) in text, f"cluster/README.md does not mention {path.name}"
    for command in ("cxr cluster up", "ray up cluster/cluster.yaml", "kubectl apply -f", "RAY_AUTH_MODE=token"):
        assert command in text


def test_no_token_is_shipped():
    # tokens come from files under runs/ (git-ignored) or from a Secret created with kubectl, never from the repo
    assert re.search(r"^/?runs/?$", (ROOT / ".gitignore").read_text(), re.MULTILINE)
    assert not list(CLUSTER.rglob("auth_token*"))
    for kind in KUBERAY:
        for pod in pod_templates(cluster_spec(kind)).values():
            for container in pod["containers"]:
                for env in container.get("env", []):
                    assert not (env["name"] == "RAY_AUTH_TOKEN" and "value" in env), "token literal in a manifest"


# --------------------------------------------------------------------------------------------- the image


def test_one_image_everywhere_tagged_with_the_pinned_ray():
    docker = load(LAUNCHER)["docker"]
    images = {docker[key] for key in ("image", "head_image", "worker_image") if key in docker}
    for kind in KUBERAY:
        images |= {c["image"] for pod in pod_templates(cluster_spec(kind)).values() for c in pod["containers"]}
    assert len(images) == 1, f"different images: {sorted(images)}"
    (image,) = images
    tag_parts = image.rsplit(":", 1)[1].split("-")
    assert tag_parts[0] == project_version()
    assert f"ray{pin('ray')}" in tag_parts
    base_tag_parts = docker_arg("FROM").split(":", 1)[1].split("-")
    assert set(base_tag_parts[1:]) <= set(tag_parts), "the tag should name the base's Python and CUDA variant"
    assert image in README.read_text() and image in DOCKERFILE.read_text()  # the documented build command


def test_dockerfile_builds_on_the_pinned_ray_and_installs_the_project():
    assert docker_arg("FROM").startswith(f"rayproject/ray:{pin('ray')}-")
    runs = " ".join(args for name, args in dockerfile() if name == "RUN")
    for package in ("torch", "torchvision"):
        assert re.findall(rf"(?<![\w.-]){package}==(\S+)", runs) == [pin(package)]
    assert re.search(r"pip install [^&;]*-e \.", runs)
    assert docker_arg("WORKDIR") == "/home/ray/cxr"


# ---------------------------------------------------------------------------------------- launcher YAML


def test_launcher_config_passes_the_checks_of_ray_up():
    # what `ray up` runs before it contacts the cloud: defaults merged in, then the schema and node-type rules
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(LAUNCHER)))


def test_launcher_has_a_cpu_head_and_autoscaled_gpu_workers():
    config = load(LAUNCHER)
    assert config["cluster_name"] and config["provider"]["type"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU")]
    assert gpu_workers
    for worker in gpu_workers:
        assert worker["resources"]["GPU"] >= 1 and worker["resources"]["CPU"] >= 1
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]


def test_launcher_syncs_and_installs_the_checkout_but_not_local_state():
    config = load(LAUNCHER)
    (code_dir,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert any(re.search(rf"pip install [^;&]*-e {re.escape(code_dir)}$", c) for c in config["setup_commands"])
    assert {".venv", "runs", "mlruns", "data"} <= {pattern.strip("/") for pattern in config["rsync_exclude"]}


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_launcher_starts_every_node_with_token_auth(key):
    config = load(LAUNCHER)
    starts = [command for command in config[key] if "ray start" in command]
    assert starts
    for command in starts:
        setup = command[: command.index("ray start")]  # each command is its own shell: env must be set here
        assert re.search(r"\bRAY_AUTH_MODE=token\b", setup)
        token = re.search(r"\bRAY_AUTH_TOKEN_PATH=(\S+)", setup).group(1).replace("$HOME/", "~/")
        token_dir = token.rsplit("/", 1)[0]
        assert config["file_mounts"][token_dir].startswith("runs/"), "the token must come from git-ignored runs/"
        assert f"chmod 600 {token}" in setup
        assert f"cd {next(r for r, local in config['file_mounts'].items() if local == '.')}" in setup
        if key.startswith("head"):
            assert "--dashboard-host=127.0.0.1" in command and "--dashboard-port=8265" in command


# ------------------------------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("kind", KUBERAY)
def test_kuberay_cluster_runs_the_pinned_ray_with_token_auth(kind):
    manifest = load(KUBERAY[kind][0])
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    spec = cluster_spec(kind)
    assert spec["rayVersion"] == pin("ray")
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]


@pytest.mark.parametrize("kind", KUBERAY)
def test_kuberay_cluster_has_a_cpu_head_and_a_gpu_worker_group(kind):
    spec = cluster_spec(kind)
    head = resources(spec["headGroupSpec"])
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(head[bound]) and GPU not in head[bound]
    gpu_groups = [group for group in spec["workerGroupSpecs"] if GPU in resources(group)["limits"]]
    assert gpu_groups
    for group in gpu_groups:
        requests, limits = resources(group)["requests"], resources(group)["limits"]
        assert {"cpu", "memory", GPU} <= set(limits) and {"cpu", "memory"} <= set(requests)
        assert requests.get(GPU) == limits[GPU]  # Kubernetes wants requests equal to limits for GPUs
        assert int(limits[GPU]) >= 1
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]


@pytest.mark.parametrize("kind", KUBERAY)
def test_kuberay_pods_share_the_runs_volume_from_the_image_workdir(kind):
    claim = load(STORAGE)
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    workdir = docker_arg("WORKDIR")
    for group, pod in pod_templates(cluster_spec(kind)).items():
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        container = ray_container(pod)
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert container["workingDir"] == workdir, group
        runs = volumes[mounts[f"{workdir}/runs"]]
        assert runs["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], group


def test_rayjob_entrypoint_runs_known_stages_in_order():
    spec = load(RAYJOB)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    # one quoted script: KubeRay's submitter would run anything after a bare `&&` in its own pod
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3, argv
    steps = [shlex.split(step) for step in argv[2].split("&&")]
    assert steps[0] == ["cd", docker_arg("WORKDIR")]
    stage_modules = {command.module.removesuffix(".__main__") for command in COMMANDS if command.submittable}
    stages = []
    for step in steps[1:]:
        assert step[:2] == ["python", "-m"], step
        module, args = step[2], step[3:]
        assert module in stage_modules, f"{module} is not a stage of pipelines/cli.py"
        assert module_origin(module).is_file()
        assert (ROOT / args[args.index("--config") + 1]).is_file()
        stages.append((module, args))
    modules = [module for module, _ in stages]
    assert modules[0] == "pipelines.data.ingest" and "pipelines.evaluate.evaluation" not in modules[:-1]
    trained = {args[args.index("--model") + 1] for module, args in stages if module == "pipelines.train.driver"}
    assert trained == {"cnn", "vit"}
    assert modules.index("tune.ensemble_sweep") > modules.index("pipelines.train.driver")


def test_rayservice_serves_the_app_of_serve_config_yaml():
    local = load(ROOT / "serve" / "serve_config.yaml")
    in_cluster = yaml.safe_load(load(RAYSERVICE)["spec"]["serveConfigV2"])
    assert in_cluster["applications"] == local["applications"]  # name, route_prefix, import_path, args, ...
    assert in_cluster.get("proxy_location") == local.get("proxy_location")
    assert in_cluster["http_options"]["port"] == local["http_options"]["port"]
    # in a pod the proxies must listen on every interface, or the Service in front of them cannot reach them
    assert in_cluster["http_options"]["host"] == "0.0.0.0"
    head = ray_container(cluster_spec("RayService")["headGroupSpec"]["template"]["spec"])
    assert local["http_options"]["port"] in {p["containerPort"] for p in head["ports"]}


# ---------------------------------------------------------------------------------------------- monitoring


def test_prometheus_reads_the_discovery_file_ray_writes():
    assert discovery_files(load(PROMETHEUS)) == [DISCOVERY_FILE]
    # the file Ray's own generated Prometheus config points at, read from the installed package (no import)
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    shipped = load(ray_dir / "dashboard" / "modules" / "metrics" / "export" / "prometheus" / "prometheus.yml")
    assert discovery_files(shipped) == [DISCOVERY_FILE]
