"""A Helios serving config -> a KubeRay RayService manifest, so the cluster runs the laptop's config.

    python -m deployments.render_rayservice deployments/configs/example.yaml > k8s/rayservice.yaml
    python -m deployments.render_rayservice CONFIG --image registry.example/helios:0.1.0 --name my-llms

`serveConfigV2` holds one Serve application, `deployments.app:build_app`, whose `args` are the
config itself (validated here with the same schema `helios serve` uses). `http` and
`metrics_export_port` are laptop-only keys: on a cluster Serve's `http_options` and KubeRay's
metrics port take their place, so they are dropped from `args`. Editing `serveConfigV2` (re-render
and apply) updates Serve in place; editing the cluster part makes KubeRay roll a new RayCluster.

The cluster: a head pod (GCS, dashboard, Serve's controller; `num-cpus: 0` keeps replicas off it),
a CPU worker group, and a GPU worker group (`nvidia.com/gpu`) that Ray's autoscaler grows from zero
when a model asks for `num_gpus`. KubeRay sets the readiness and liveness probes itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from deployments.config import load_config, parse_config

RAY_VERSION = "2.60.0"  # the Ray that k8s/Dockerfile installs (tests/test_k8s.py checks they agree)
IMAGE = "helios:0.1.0"  # built from k8s/Dockerfile
IMPORT_PATH = "deployments.app:build_app"
LAPTOP_ONLY = {"http", "metrics_export_port"}
SERVE_PORT, DASHBOARD_PORT, METRICS_PORT, GCS_PORT, CLIENT_PORT = 8000, 8265, 8080, 6379, 10001


def serve_config(data: dict, app_name: str = "helios") -> dict:
    """Ray Serve's config file (the RayService's `serveConfigV2`) for a Helios config mapping, whose
    keys go into `args` as written (validated first: a bad config fails here, not in the cluster)."""
    parse_config(data)
    args = {key: value for key, value in data.items() if key not in LAPTOP_ONLY}
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
            "applications": [{"name": app_name, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}]}


def _container(name: str, image: str, cpu: str, memory: str, ports: dict[str, int], gpus: int = 0) -> dict:
    resources = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
            "resources": {"requests": dict(resources), "limits": dict(resources)},
            "ports": [{"name": port_name, "containerPort": port} for port_name, port in ports.items()],
            # Ray runs workers at nice 15 by default, behind the HTTP proxy in the same pod (deployments/run.py)
            "env": [{"name": "RAY_worker_niceness", "value": "0"}]}


def _worker_group(name: str, image: str, cpu: str, memory: str, replicas: int, max_replicas: int,
                  gpus: int = 0) -> dict:
    container = _container("ray-worker", image, cpu, memory,
                           {"serve": SERVE_PORT, "metrics": METRICS_PORT}, gpus)
    pod = {"containers": [container]}
    if gpus:  # GPU nodes are usually tainted so that only pods asking for GPUs land there
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"groupName": name, "replicas": replicas, "minReplicas": 0 if gpus else replicas,
            "maxReplicas": max_replicas, "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
            "template": {"spec": pod}}


def rayservice(data: dict, name: str = "helios", image: str = IMAGE) -> dict:
    """The RayService manifest: the cluster below, and `serveConfigV2` from the config mapping `data`."""
    head = _container("ray-head", image, "2", "8Gi",
                      {"gcs-server": GCS_PORT, "dashboard": DASHBOARD_PORT, "client": CLIENT_PORT,
                       "serve": SERVE_PORT, "metrics": METRICS_PORT})
    cluster = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,  # adds GPU workers when a replica asks for num_gpus
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                             "metrics-export-port": str(METRICS_PORT)},
                          "template": {"spec": {"containers": [head]}}},
        "workerGroupSpecs": [_worker_group("cpu", image, "4", "16Gi", replicas=1, max_replicas=8),
                             _worker_group("gpu", image, "8", "32Gi", replicas=0, max_replicas=4, gpus=1)],
    }
    serve_yaml = yaml.safe_dump(serve_config(data), sort_keys=False)
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "helios"}},
            "spec": {"serveConfigV2": serve_yaml, "rayClusterConfig": cluster}}


class _LiteralStr(str):
    """Dumped as a YAML block (`|`), so serveConfigV2 reads as the YAML it is."""


yaml.SafeDumper.add_representer(_LiteralStr, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|"))


def read_config(path: str | Path) -> dict:
    """A serving YAML file as written (load_config checks it first, with its error messages)."""
    load_config(path)
    return yaml.safe_load(Path(path).read_text()) or {}


def render(path: str, name: str = "helios", image: str = IMAGE) -> str:
    """The manifest's file text for the config at `path` (stable: a test compares it with the committed one)."""
    source = Path(path).as_posix()
    manifest = rayservice(read_config(path), name, image)
    manifest["spec"]["serveConfigV2"] = _LiteralStr(manifest["spec"]["serveConfigV2"])
    header = (f"# Rendered from {source} by `python -m deployments.render_rayservice {source}`; do not edit:\n"
              "# change the config and render again (tests/test_k8s.py fails when this file is stale).\n")
    return header + yaml.safe_dump(manifest, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.render_rayservice",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a Helios serving YAML (as for `helios serve CONFIG`)")
    parser.add_argument("--name", default="helios", help="the RayService's name")
    parser.add_argument("--image", default=IMAGE, help="the image built from k8s/Dockerfile")
    parser.add_argument("--out", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    text = render(args.config, args.name, args.image)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
