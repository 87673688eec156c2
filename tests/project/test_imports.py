"""Imports run one way: ``model`` <- ``components``, ``serving``, ``webapp``, ``gateway`` <- ``rollout`` <-
``pipelines``, ``benchmarks`` (docs/design.md, "Packages and what they may import"); ``deploy`` stands alone.

Read from the source with ``ast``, every ``.py`` file of the repository, imports at module level and inside
functions alike, so that no new file and no lazy import slips through. Also: no import cycle between the
modules of one package, and the third-party imports each package must not make (serving and the web app
without torch, the web app and the gateway without kserve or onnxruntime, the ML core without kfp or kserve),
including those a package pulls in through the project modules it imports.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

#: The import tier of each package: a package imports its own modules and those of lower tiers only.
TIERS = {"model": 0, "components": 1, "serving": 1, "webapp": 1, "gateway": 1, "rollout": 2, "pipelines": 3,
         "benchmarks": 3}
#: Imports across one tier that the design allows: the gateway records studies through webapp's storage layer;
#: the benchmarks measure every part, the pipeline included.
SAME_TIER_ALLOWED = {("gateway", "webapp"), ("benchmarks", "pipelines")}
#: Imports allowed from named modules only: rollout builds on serving in its local runner alone.
ONLY_FROM = {("rollout", "serving"): {"rollout.local_canary"}}
#: Imports nobody else makes, and which make none: the chart renderer.
STANDALONE = {"deploy"}
#: Folders of Python files outside the tiers: the tests import anything.
UNTIERED = {"tests"}
#: Third-party packages a package must not import, directly or through the project modules it imports.
FORBIDDEN = {
    "model": {"kfp", "kserve"},
    "serving": {"torch", "torchvision"},
    "webapp": {"torch", "torchvision", "kserve", "onnxruntime"},
    "gateway": {"torch", "torchvision", "kserve", "onnxruntime"},
}
PACKAGES = set(TIERS) | STANDALONE


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a project module resolved as far as it exists), or a third-party name
    line: int
    module_level: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def python_files() -> dict[str, Path]:
    """Every tracked-or-not .py file of the repository, by module name (virtual environments aside)."""
    files = {}
    for path in sorted(REPO.rglob("*.py")):
        relative = path.relative_to(REPO)
        if any(part.startswith(".") or part in ("node_modules", "__pycache__", "site") for part in relative.parts):
            continue
        files[module_name(path)] = path
    return files


def _resolve(name: str) -> str:
    """A project module as far as it exists (``from serving import stack`` is ``serving.stack``)."""
    while name and name not in python_files() and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


@functools.cache
def imports_of(module: str) -> tuple[Import, ...]:
    path = python_files()[module]
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in python_files() else base
                     for alias in node.names]
        else:
            continue
        for name in dict.fromkeys(names):
            target = _resolve(name) if name.split(".")[0] in python_files() else name
            found.append(Import(module, target, node.lineno, id(node) in top))
    return tuple(found)


def where(imp: Import) -> str:
    return f"{python_files()[imp.source].relative_to(REPO)}:{imp.line}"


def project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES | UNTIERED


def test_every_python_file_belongs_to_a_package_with_a_tier():
    strays = [str(path.relative_to(REPO)) for module, path in python_files().items()
              if module.split(".")[0] not in PACKAGES | UNTIERED]
    assert not strays, f"Python files outside every package of the import tiers (add the package to TIERS): {strays}"
    assert {"model", "serving", "webapp", "rollout", "pipelines", "components", "benchmarks", "deploy"} <= \
        {m.split(".")[0] for m in python_files()}, "the scan found too few packages: is REPO right?"


def allowed(source: str, target: str) -> bool:
    low, high = target.split(".")[0], source.split(".")[0]
    if low == high:
        return True
    if low in STANDALONE | UNTIERED or high in STANDALONE:
        return False
    if (high, low) in ONLY_FROM and source not in ONLY_FROM[(high, low)]:
        return False
    return TIERS[low] < TIERS[high] or (high, low) in SAME_TIER_ALLOWED


def test_imports_run_from_higher_packages_to_lower_ones_only():
    wrong = [f"{where(imp)}: {imp.source} imports {imp.target}"
             for module in python_files() if module.split(".")[0] in PACKAGES
             for imp in imports_of(module) if project(imp.target) and not allowed(imp.source, imp.target)]
    assert not wrong, "imports that run against the tiers (docs/design.md):\n" + "\n".join(wrong)


def test_the_tier_rule_refuses_what_the_design_refuses():
    """The rule itself, on the imports it exists to stop (so that an always-true rule cannot pass)."""
    assert not allowed("serving.cli", "rollout.local")
    assert not allowed("model.data", "serving.settings")
    assert not allowed("webapp.inference", "serving.client")
    assert not allowed("rollout.cli", "serving.settings")  # only the local runner builds on serving
    assert not allowed("pipelines.cli", "deploy.manifests") and not allowed("deploy.manifests", "model.cli")
    assert allowed("rollout.local_canary", "serving.stack") and allowed("gateway.store", "webapp.storage")
    assert allowed("serving.inputs", "model.preprocessing") and allowed("pipelines.cli", "components.image")


def cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each one holds an import cycle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_the_modules_of_a_package():
    """Counting imports inside functions too: a lazy import that closes a cycle still ties the two modules."""
    found = []
    for package in sorted(PACKAGES):
        modules = {m for m in python_files() if m.split(".")[0] == package}
        found += cycles({m: sorted({i.target for i in imports_of(m) if i.target in modules and i.target != m})
                         for m in modules})
    assert not found, f"import cycles: {found}"


def test_the_cycle_check_finds_cycles():
    assert cycles({"a": ["b"], "b": ["a"], "c": ["a"]}) == [["a", "b"]]
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["d"]}) == [["a", "b", "c"]]
    assert cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def _loaded_at_import(module: str) -> dict[str, list[str]]:
    """What importing ``module`` runs: {third-party root: the chain of project modules that imports it}, over
    module-level imports (parent packages included: importing ``a.b`` runs ``a/__init__.py`` too)."""
    chains, seen, todo = {}, set(), [[module]]
    while todo:
        chain = todo.pop()
        current = chain[-1]
        if current in seen:
            continue
        seen.add(current)
        parents = [current.rsplit(".", i)[0] for i in range(1, current.count(".") + 1)]
        todo += [chain + [p] for p in parents if p in python_files()]
        for imp in imports_of(current):
            if not imp.module_level:
                continue
            if project(imp.target):
                todo.append(chain + [imp.target])
            else:
                chains.setdefault(imp.target.split(".")[0], chain)
    return chains


def test_packages_import_none_of_their_forbidden_third_party_packages():
    wrong = []
    for module in sorted(python_files()):
        banned = FORBIDDEN.get(module.split(".")[0], set())
        for imp in imports_of(module) if banned else ():
            if imp.target.split(".")[0] in banned:
                wrong.append(f"{where(imp)}: {module} imports {imp.target}")
            elif project(imp.target):  # what that import runs, at module level, down the project's modules
                for root, chain in _loaded_at_import(imp.target).items():
                    if root in banned:
                        wrong.append(f"{where(imp)}: {module} imports {' -> '.join(chain)}, which imports {root}")
    assert not wrong, "forbidden third-party imports:\n" + "\n".join(sorted(set(wrong)))


def test_the_third_party_check_follows_module_level_imports_through_the_project():
    """Not vacuous: torch is found in the training code, and an import two modules away is found with its way."""
    assert "torch" in _loaded_at_import("model.training")
    assert "torch" not in _loaded_at_import("model.preprocessing")  # serving's share of the ML core
    assert _loaded_at_import("serving.inputs")["pydantic_settings"] == ["serving.inputs", "serving.settings"]


def test_serve_hands_the_traffic_split_over_to_rollout_with_every_flag_it_needs():
    """``serve --traffic-split`` runs ``rollout serve-local`` through the command registry, not an import: the
    namespace serve parsed must hold everything that verb parses, with the same values."""
    from model.cli import build_parser, handler_of
    from rollout.local_canary import cmd_serve_local

    assert handler_of("rollout", "serve-local") is cmd_serve_local
    argv = ["--model", "models:/pneumonia/1", "--canary", "models:/pneumonia/2", "--canary-percent", "20",
            "--port", "9000", "--max-batch-size", "2", "--drain-seconds", "3", "--no-spinning"]
    parser = build_parser()
    served = vars(parser.parse_args(["serve", *argv, "--traffic-split"]))
    direct = {k: v for k, v in vars(parser.parse_args(["rollout", "serve-local", *argv])).items()
              if k not in ("func", "command", "rollout_command")}
    assert {k: served.get(k, "missing") for k in direct} == direct
    assert direct["drain_timeout_s"] == 3.0 and direct["port"] == 9000
