"""The documentation: the site builds with ``mkdocs build --strict``, every test its claims tables name exists,
and the README stays a front page (short, its links resolve, it maps every page of the site).

A "claim | proved by" table names tests as ``tests/FILE.py::TEST``, ``::TEST`` for another test of the file
named before it in the same cell, ``PREFIX*`` for at least one test whose name starts so, and a bare
``FILE.py`` for a whole file. Test names are collected with ``ast`` (no import, so no heavy dependency runs);
a parametrized name may be written with its brackets, which are ignored.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = next(parent for parent in Path(__file__).resolve().parents if (parent / "mkdocs.yml").is_file())
README = ROOT / "README.md"
README_LIMIT_BYTES = 10 * 1024  # issue 20: "the README is at most about 10 KB"

CLAIMS_HEADER = re.compile(r"^\|\s*claim\s*\|\s*proved by\s*\|\s*$", re.IGNORECASE)
CODE_SPAN = re.compile(r"`([^`]+)`")
# tests/FILE.py::NAME, FILE.py::NAME, ::NAME, FILE.py; NAME may end in `*` (a prefix) or carry [params].
TEST_REFERENCE = re.compile(r"^(?P<file>(?:[\w.-]+/)*test_\w+\.py)?(?:::(?P<name>\w+(?:\*|\[[^\]]*\])?))?$")
SNIPPET_LINE = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::[\w-]+)?"$')
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files(root: Path) -> list[Path]:
    """README.md and every page under docs/: wherever a claims table may stand."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def claims_rows(text: str) -> list[tuple[int, str]]:
    """(line number, "proved by" cell) of every row of every "claim | proved by" table in ``text``."""
    rows = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        if not CLAIMS_HEADER.match(lines[index].strip()):
            index += 1
            continue
        index += 2  # the header and its |---|---| line
        while index < len(lines) and lines[index].lstrip().startswith("|"):
            cells = lines[index].strip().strip("|").split("|")
            rows.append((index + 1, cells[-1].strip()))
            index += 1
    return rows


def collected_test_names(path: Path) -> set[str]:
    """The test functions pytest would collect from ``path``: module-level ``test*`` functions and the
    ``test*`` methods of ``Test*`` classes."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    names = {node.name for node in tree.body if isinstance(node, functions) and node.name.startswith("test")}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {item.name for item in node.body if isinstance(item, functions) and item.name.startswith("test")}
    return names


def find_test_file(tests_dir: Path, reference: str) -> tuple[Path | None, str]:
    """The file under ``tests_dir`` that ``reference`` (``tests/x/test_y.py``, ``x/test_y.py`` or ``test_y.py``)
    names, wherever in tests/ it lives now; else None and why."""
    relative = reference.removeprefix("tests/")
    matches = [path for path in tests_dir.rglob("*.py")
               if (inside := path.relative_to(tests_dir).as_posix()) == relative or inside.endswith("/" + relative)]
    if len(matches) == 1:
        return matches[0], ""
    if not matches:
        return None, "no such test file"
    found = ", ".join(sorted(path.relative_to(tests_dir).as_posix() for path in matches))
    return None, f"ambiguous: {found}"


def missing_claimed_tests(markdown: list[Path], tests_dir: Path, root: Path) -> tuple[list[str], int]:
    """Every test reference of every claims table that does not resolve, as ``page:line: `ref`: why``, and
    how many references were checked."""
    problems: list[str] = []
    checked = 0
    names_cache: dict[Path, set[str]] = {}
    for page in markdown:
        where = page.relative_to(root).as_posix()
        for line_number, cell in claims_rows(page.read_text(encoding="utf-8")):
            spans = CODE_SPAN.findall(cell)
            if not spans:
                problems.append(f"{where}:{line_number}: a claim that names no test")
            current_file: Path | None = None
            for span in spans:
                checked += 1
                match = TEST_REFERENCE.match(span.strip())
                if not match or not (match["file"] or match["name"]):
                    problems.append(f"{where}:{line_number}: `{span}`: not a test reference (FILE.py::TEST)")
                    continue
                if match["file"]:
                    current_file, why = find_test_file(tests_dir, match["file"])
                    if current_file is None:
                        problems.append(f"{where}:{line_number}: `{span}`: {why}")
                        continue
                elif current_file is None:
                    problems.append(f"{where}:{line_number}: `{span}`: `::TEST` with no file named before it")
                    continue
                name = match["name"]
                if not name:
                    continue  # a whole file: that it exists is the claim
                names = names_cache.setdefault(current_file, collected_test_names(current_file))
                if name.endswith("*"):
                    found = any(test.startswith(name[:-1]) for test in names)
                else:
                    found = name.split("[", 1)[0] in names
                if not found:
                    shown = current_file.relative_to(tests_dir).as_posix()
                    problems.append(f"{where}:{line_number}: `{span}`: no test {name} in tests/{shown}")
    return problems, checked


def test_every_test_named_in_the_claims_tables_exists():
    claims_page = ROOT / "docs" / "developer" / "claims.md"
    assert claims_rows(claims_page.read_text(encoding="utf-8")), f"{claims_page} has no claim | proved by table"
    problems, checked = missing_claimed_tests(markdown_files(ROOT), ROOT / "tests", ROOT)
    assert checked, "no test reference found in the claims tables"
    if problems:
        pytest.fail("claims tables name tests that do not exist:\n" + "\n".join(problems), pytrace=False)


def test_the_claims_checker_reports_every_kind_of_missing_test(tmp_path):
    tests_dir = tmp_path / "tests"
    (tests_dir / "serving").mkdir(parents=True)
    (tests_dir / "test_alpha.py").write_text(
        "import pytest\n"
        "def test_one(): pass\n"
        "@pytest.mark.parametrize('x', [1, 2])\n"
        "def test_two(x): pass\n"
        "async def test_three(): pass\n"
        "class TestGroup:\n"
        "    def test_method(self): pass\n"
        "def helper_test(): pass\n", encoding="utf-8")
    (tests_dir / "serving" / "test_beta.py").write_text("def test_prefix_a(): pass\n", encoding="utf-8")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "claims.md"
    page.write_text(
        "| claim | proved by |\n"
        "| --- | --- |\n"
        "| ok | `test_alpha.py::test_one`, `::test_two[1]`, `::test_three`; `tests/test_alpha.py::test_method` |\n"
        "| prefix and moved file | `test_beta.py::test_prefix_*`, `serving/test_beta.py`, `test_alpha.py` |\n"
        "| missing name | `test_alpha.py::test_four`, `::helper_test` |\n"
        "| missing prefix | `test_beta.py::test_nothing_*` |\n"
        "| missing file | `test_gamma.py::test_one` |\n"
        "| no file before | `::test_one` |\n"
        "| malformed | `test_alpha.py:test_one` |\n"
        "| unproved | nothing named |\n"
        "\n"
        "text after the table: `test_alpha.py::test_ignored`\n", encoding="utf-8")
    problems, checked = missing_claimed_tests([page], tests_dir, tmp_path)
    assert checked == 13
    assert problems == [
        "docs/claims.md:5: `test_alpha.py::test_four`: no test test_four in tests/test_alpha.py",
        "docs/claims.md:5: `::helper_test`: no test helper_test in tests/test_alpha.py",
        "docs/claims.md:6: `test_beta.py::test_nothing_*`: no test test_nothing_* in tests/serving/test_beta.py",
        "docs/claims.md:7: `test_gamma.py::test_one`: no such test file",
        "docs/claims.md:8: `::test_one`: `::TEST` with no file named before it",
        "docs/claims.md:9: `test_alpha.py:test_one`: not a test reference (FILE.py::TEST)",
        "docs/claims.md:10: a claim that names no test",
    ]


def test_the_docs_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav, a missing snippet (README
    section, BENCHMARKS.md) fails it. The site goes to a temporary folder."""
    site = tmp_path / "site"
    # NO_MKDOCS_2_WARNING: Material prints an end-of-life banner on every build; advice, not a docs problem.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if "No module named mkdocs" in result.stderr:
        pytest.fail("mkdocs is not installed: `pip install -e '.[docs]'` (make test installs it)")
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}{result.stderr[-6000:]}"
    for page in ("index.html", "developer/claims/index.html", "developer/benchmarks/index.html"):
        assert (site / page).is_file(), f"the site has no {page}"
    benchmarks = (site / "developer" / "benchmarks" / "index.html").read_text(encoding="utf-8")
    first_heading = next(line for line in (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8").splitlines()
                         if line.startswith("## "))
    assert first_heading[3:].split("`")[0].strip() in benchmarks, "BENCHMARKS.md is not included in the site"


def test_the_readme_stays_a_front_page():
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, (
        f"README.md is {size} bytes, over {README_LIMIT_BYTES}: move the detail to a page under docs/")


def nav_pages(config: Path) -> list[str]:
    """The pages of mkdocs.yml's nav, in order (its !relative and !!python tags are not needed here)."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    pages: list[str] = []

    def walk(entry):
        if isinstance(entry, str):
            pages.append(entry)
        elif isinstance(entry, list):
            for item in entry:
                walk(item)
        elif isinstance(entry, dict):
            for value in entry.values():
                walk(value)

    walk(yaml.load(config.read_text(encoding="utf-8"), Loader=Loader)["nav"])
    return pages


def test_the_readme_links_resolve_and_map_every_page_of_the_site():
    links = {link.split("#", 1)[0] for link in MARKDOWN_LINK.findall(README.read_text(encoding="utf-8"))
             if not re.match(r"^[a-z]+:", link) and not link.startswith("#")}
    broken = sorted(link for link in links if not (ROOT / link).exists())
    if broken:
        pytest.fail(f"README.md links to files that do not exist: {', '.join(broken)}", pytrace=False)
    unmapped = []
    for page in nav_pages(ROOT / "mkdocs.yml"):
        if page == "index.md":
            continue  # the site's home is what the README itself says
        path = f"docs/{page}"
        lines = [line for line in (ROOT / path).read_text(encoding="utf-8").splitlines() if line.strip()]
        snippet = SNIPPET_LINE.match(lines[0]) if len(lines) == 1 else None
        if path not in links and not (snippet and snippet["path"] in links):
            unmapped.append(path)
    if unmapped:
        pytest.fail(f"README.md's documentation map leaves out: {', '.join(unmapped)}", pytrace=False)
