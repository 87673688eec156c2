"""Render the Helm chart, and generate manifests/ (kustomize) from it: ``python -m deploy.manifests``.

The chart in ``helm/pneumoscope`` is the one source of truth. What kustomize users apply is derived:

- ``manifests/base``: the chart with its default values, one file per object;
- ``manifests/components/<switch>``: kustomize Components, each the difference that one chart switch
  makes (``postgresql``: the in-cluster database; ``raw``: RawDeployment; ``collocated``: one pod;
  ``monitoring``: PodMonitors, ServiceMonitor, PrometheusRule, Grafana dashboard),
  as new objects, JSON patches of changed ones and deletions;
- ``manifests/overlays/*`` are written by hand and stay small: a namespace, image tags, sizes, and
  which components to use. Each has an example values file in ``helm/pneumoscope/examples`` that
  renders the same objects (a test checks it).

``--check`` regenerates into a temporary folder and fails when manifests/ differs (stale).
"""

from __future__ import annotations

import argparse
import json
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from deploy.tools import binary

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "pneumoscope"
MANIFESTS = REPO / "manifests"
RELEASE = "pneumoscope"
HEADER = "# Generated from helm/pneumoscope by `make manifests` (python -m deploy.manifests): do not edit.\n"

#: Components: chart values that switch one feature on, on top of the defaults.
COMPONENTS = {
    "postgresql": {"postgresql": {"enabled": True}},
    "raw": {"inference": {"deploymentMode": "RawDeployment",
                          "transformer": {"scaleMetric": "cpu", "scaleTarget": 70},
                          "predictor": {"scaleMetric": "cpu", "scaleTarget": 70}}},
    "collocated": {"inference": {"collocated": True}},
    "monitoring": {"monitoring": {"enabled": True}},
}

#: Overlay -> the example values file that renders the same objects with helm.
OVERLAY_VALUES = {name: CHART / "examples" / f"{name}.yaml" for name in ("dev", "production", "raw", "collocated")}


class RenderError(Exception):
    """helm or kubectl refused; the message is their first error line."""


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise RenderError(" ".join(lines[:4]) or f"{argv[0]} exited with {result.returncode}")
    return result.stdout


def load_all(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def helm_template(values_files=(), set_values: dict | None = None, namespace: str = RELEASE) -> list[dict]:
    """The chart's objects for these values (``helm template``)."""
    argv = [str(binary("helm")), "template", RELEASE, str(CHART), "--namespace", namespace]
    for path in values_files:
        argv += ["-f", str(path)]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as extra:
        if set_values:
            yaml.safe_dump(set_values, extra)
            extra.flush()
            argv += ["-f", extra.name]
        return load_all(_run(argv))


def kustomize(path: Path) -> list[dict]:
    """The objects of a kustomization (``kubectl kustomize``, as ``kubectl apply -k`` builds them)."""
    return load_all(_run([str(binary("kubectl")), "kustomize", str(path)]))


def key(obj: dict) -> tuple[str, str, str]:
    return obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else "", obj["kind"], obj["metadata"]["name"]


def file_name(obj: dict) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def _dump(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False, width=120)


def _target(obj: dict) -> dict:
    group, kind, name = key(obj)
    version = obj["apiVersion"].split("/")[-1]
    return {"group": group, "version": version, "kind": kind, "name": name} if group else \
        {"version": version, "kind": kind, "name": name}


def _pointer(path: tuple) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _json_patch(old, new, path: tuple = ()) -> list[dict]:
    """RFC 6902 operations turning ``old`` into ``new``: maps are followed key by key, anything else
    (lists, scalars) is replaced whole, so a patch names exactly what a chart switch changes."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops = []
        for k in old:
            if k not in new:
                ops.append({"op": "remove", "path": _pointer(path + (k,))})
            elif old[k] != new[k]:
                ops += _json_patch(old[k], new[k], path + (k,))
        ops += [{"op": "add", "path": _pointer(path + (k,)), "value": new[k]} for k in new if k not in old]
        return ops
    return [{"op": "replace", "path": _pointer(path), "value": new}]


def write_base(out: Path, objects: list[dict]) -> None:
    out.mkdir(parents=True)
    names = []
    for obj in objects:
        names.append(file_name(obj))
        (out / names[-1]).write_text(HEADER + _dump(obj))
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": sorted(names)}
    (out / "kustomization.yaml").write_text(HEADER + _dump(kustomization))


def write_component(out: Path, base: list[dict], variant: list[dict], comment: str) -> None:
    """A kustomize Component that turns ``base`` into ``variant``."""
    out.mkdir(parents=True)
    before = {key(o): o for o in base}
    after = {key(o): o for o in variant}
    resources, patches = [], []
    for k, obj in sorted(after.items()):
        if k not in before:
            resources.append(file_name(obj))
            (out / resources[-1]).write_text(HEADER + _dump(obj))
        elif obj != before[k]:
            patch = f"patch-{file_name(obj)}"
            (out / patch).write_text(HEADER + _dump(_json_patch(before[k], obj)))
            patches.append({"path": patch, "target": _target(obj)})
    for k, obj in sorted(before.items()):
        if k not in after:
            patches.append({"patch": _dump({"$patch": "delete", "apiVersion": obj["apiVersion"], "kind": obj["kind"],
                                            "metadata": {k: obj["metadata"][k] for k in ("name", "namespace")
                                                         if k in obj["metadata"]}})})
    component = {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component"}
    if resources:
        component["resources"] = sorted(resources)
    if patches:
        component["patches"] = patches
    (out / "kustomization.yaml").write_text(HEADER + f"# {comment}\n" + _dump(component))


def generate(root: Path = MANIFESTS) -> None:
    """(Re)write ``root/base`` and ``root/components``; overlays are left alone."""
    base = helm_template()
    for folder in ("base", "components"):
        shutil.rmtree(root / folder, ignore_errors=True)
    write_base(root / "base", base)
    for name, values in COMPONENTS.items():
        write_component(root / "components" / name, base, helm_template(set_values=values),
                        f"the chart with {json.dumps(values)}")


def stale(root: Path = MANIFESTS) -> list[str]:
    """Generated files that differ from a fresh rendering (empty = up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        differences = []
        for folder in ("base", "components"):
            differences += _compare(fresh / folder, root / folder, folder)
        return differences


def _compare(a: Path, b: Path, prefix: str) -> list[str]:
    if not b.is_dir():
        return [prefix + "/ (missing)"]
    cmp = filecmp.dircmp(a, b)
    out = [f"{prefix}/{n}" for n in cmp.left_only + cmp.right_only + cmp.diff_files]
    for sub in cmp.common_dirs:
        out += _compare(a / sub, b / sub, f"{prefix}/{sub}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.manifests", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that manifests/ is up to date")
    args = parser.parse_args(argv)
    try:
        if args.check:
            differences = stale()
            if differences:
                print(f"manifests/ is stale (run `make manifests`): {', '.join(differences)}", file=sys.stderr)
                return 1
            print("manifests/ is up to date with helm/pneumoscope")
            return 0
        generate()
    except RenderError as exc:
        print(f"deploy.manifests: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {MANIFESTS.relative_to(REPO)}/base and components/ from {CHART.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
