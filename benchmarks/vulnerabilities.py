"""Dependency vulnerability report of each image's Python environment.

    python benchmarks/vulnerabilities.py [--images serving,web,pipeline] [--service pypi|osv]
                                         [--advisories DIR] [--out benchmarks/vulnerabilities.json]

Each image installs ``pip install './[EXTRA]'`` (docker/*.Dockerfile): its environment is resolved here the same
way, with pip's own resolver against the same index (``pip install --dry-run --ignore-installed --report``), so
the report names every package and version the image would hold, the transitive ones included.

The environment is then audited with pip-audit (pinned in its own virtualenv, ``make audit`` installs it:
``.venv/pip-audit``), against PyPI's vulnerability data (``--service pypi``, the default) or OSV's. Where neither
answers, ``--advisories DIR`` audits against a local copy of an OSV-format advisory database (the PyPA advisory
database: ``vulns/<package>/<id>.yaml``), matching each pinned version against the advisory's listed versions and
ranges with ``packaging``; the report then says how old that copy is. An export of a bare mirror works too:
``git --git-dir=MIRROR archive HEAD vulns | tar x -C DIR && git --git-dir=MIRROR log -1 --format=%cI > DIR/AS_OF``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_throughput import log, write_report  # noqa: E402

#: Image -> (the extra it installs, what else its Dockerfile installs beside it).
IMAGES = {"serving": ("serve", []), "web": ("web", ["setuptools==84.2.1"]), "pipeline": ("train", [])}
PIP_AUDIT = ROOT / ".venv" / "pip-audit" / "bin" / "pip-audit"


def resolve(extra: str, also: list[str]) -> list[tuple[str, str]]:
    """(name, version) of everything ``pip install './[extra]'`` would install into an empty environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                                 "--quiet", "--report", str(report), f"{ROOT}[{extra}]", *also],
                                capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"pip could not resolve [{extra}]: {result.stderr.strip()[-1000:]}")
        installed = json.loads(report.read_text())["install"]
    return sorted((item["metadata"]["name"], item["metadata"]["version"]) for item in installed
                  if item["metadata"]["name"] != "pneumoscope")


def audit_with_pip_audit(packages: list[tuple[str, str]], service: str) -> list[dict]:
    if not PIP_AUDIT.exists():
        raise RuntimeError(f"pip-audit is missing: `make audit` installs it into {PIP_AUDIT.parent.parent}")
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("".join(f"{name}=={version}\n" for name, version in packages))
        result = subprocess.run([str(PIP_AUDIT), "-r", str(requirements), "--no-deps", "--disable-pip",
                                 "--progress-spinner", "off", "--format", "json", "--vulnerability-service", service],
                                capture_output=True, text=True, timeout=3600)
    report = json.loads(result.stdout or "{}")
    skipped = [d for d in report.get("dependencies", []) if d.get("skip_reason")]
    if len(skipped) == len(packages):
        raise RuntimeError(f"pip-audit's {service} service answered for none of the packages "
                           f"({skipped[0]['skip_reason'] if skipped else result.stderr.strip()[-300:]})")
    return [{"package": d["name"], "version": d["version"], "id": v["id"], "aliases": v.get("aliases", []),
             "fixed_in": v.get("fix_versions", []), "summary": (v.get("description") or "")[:200]}
            for d in report.get("dependencies", []) for v in d.get("vulns", [])]


def audit_with_advisories(packages: list[tuple[str, str]], folder: Path) -> list[dict]:
    """Match pinned versions against an OSV-format advisory folder (``vulns/<package>/*.yaml``)."""
    import yaml
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    by_name: dict[str, list[Path]] = {}
    for path in (folder / "vulns").glob("*/*.yaml"):
        by_name.setdefault(canonicalize_name(path.parent.name), []).append(path)
    findings = []
    for name, version in packages:
        pinned = Version(version)
        for path in sorted(by_name.get(canonicalize_name(name), [])):
            advisory = yaml.safe_load(path.read_text())
            if advisory.get("withdrawn"):
                continue
            for affected in advisory.get("affected", []):
                if canonicalize_name(affected.get("package", {}).get("name", "")) != canonicalize_name(name):
                    continue
                listed = version in affected.get("versions", [])
                fixed = []
                for span in affected.get("ranges", []):
                    if span.get("type") != "ECOSYSTEM":
                        continue
                    start, inside = None, False
                    for event in span.get("events", []):
                        try:
                            if "introduced" in event:
                                start = Version("0") if event["introduced"] == "0" else Version(event["introduced"])
                            elif "fixed" in event and start is not None:
                                fixed.append(event["fixed"])
                                inside = inside or start <= pinned < Version(event["fixed"])
                                start = None
                        except InvalidVersion:
                            continue
                    inside = inside or (start is not None and start <= pinned)
                    listed = listed or inside
                if listed:
                    findings.append({"package": name, "version": version, "id": advisory["id"],
                                     "aliases": advisory.get("aliases", []), "fixed_in": fixed,
                                     "summary": (advisory.get("summary") or advisory.get("details") or "")[:200]})
    return findings


def advisories_date(folder: Path) -> str:
    """When the advisory copy was taken: its git checkout's last commit, or the AS_OF file of an export."""
    if (folder / "AS_OF").is_file():
        return (folder / "AS_OF").read_text().strip()
    result = subprocess.run(["git", "-C", str(folder), "log", "-1", "--format=%cI"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=",".join(IMAGES), help=f"some of {', '.join(IMAGES)}")
    parser.add_argument("--service", choices=["pypi", "osv"], default="pypi", help="pip-audit's vulnerability source")
    parser.add_argument("--advisories", type=Path, help="audit against this OSV-format advisory folder instead "
                                                        "(a checkout of the PyPA advisory database)")
    parser.add_argument("--out", help="write the JSON report here too")
    args = parser.parse_args()

    started = time.perf_counter()
    report = {"benchmark": "vulnerabilities", "source": (f"advisories {args.advisories} (as of "
                                                          f"{advisories_date(args.advisories)})" if args.advisories
                                                          else f"pip-audit {args.service}"),
              "load_average": [round(x, 2) for x in os.getloadavg()], "images": {}}
    for image in args.images.split(","):
        extra, also = IMAGES[image]
        log(f"{image}: resolving .[{extra}]")
        packages = resolve(extra, also)
        log(f"{image}: auditing {len(packages)} packages")
        findings = (audit_with_advisories(packages, args.advisories) if args.advisories
                    else audit_with_pip_audit(packages, args.service))
        report["images"][image] = {"extra": extra, "packages": len(packages), "findings": findings,
                                   "environment": [f"{n}=={v}" for n, v in packages]}
        log(f"{image}: {len(findings)} finding{'s' if len(findings) != 1 else ''}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
