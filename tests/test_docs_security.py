"""docs/security.md, the threat model, cites only tests and modules that exist, and the
README and docs/operations.md lead to it. The tests are found by reading the test files'
syntax trees, not by running or importing them."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from .conftest import ROOT

DOC = (ROOT / "docs" / "security.md").read_text()
CITED_TEST = re.compile(r"tests/(test_\w+\.py)::(\w+)")
# A path in this repository the doc names: a module, the unit, an installer script.
CITED_PATH = re.compile(r"(?<![\w/.<-])((?:appliance|engines|tui|systemd)/[\w/.-]*\w|install\.sh)\b")


@cache
def defined_tests(file: str) -> frozenset[str]:
    """Every test function a test file defines, at module level or in a class."""
    tree = ast.parse((ROOT / "tests" / file).read_text(), filename=file)
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    )


def test_every_test_the_threat_model_cites_exists():
    cited = CITED_TEST.findall(DOC)
    assert len(cited) >= 40, "the pattern no longer finds the doc's citations"
    missing = [
        f"tests/{file}::{name}"
        for file, name in cited
        if not (ROOT / "tests" / file).is_file() or name not in defined_tests(file)
    ]
    assert not missing, missing


def test_every_module_the_threat_model_cites_exists():
    cited = set(CITED_PATH.findall(DOC))
    assert {"appliance/fleet/landlock.py", "appliance/fleet/sandbox.py", "appliance/api/admin_access.py"} <= cited
    missing = sorted(path for path in cited if not (ROOT / path).exists())
    assert not missing, missing


def test_the_citation_patterns_catch_a_wrong_name():
    """The checks above would fail on a renamed test or a moved module."""
    assert "test_no_such_test" not in defined_tests("test_landlock.py")
    assert CITED_TEST.findall("`tests/test_landlock.py::test_no_such_test`") == [
        ("test_landlock.py", "test_no_such_test")
    ]
    assert CITED_PATH.findall("in `appliance/fleet/gone.py`, not `<cache_dir>/hf`") == ["appliance/fleet/gone.py"]
    assert not Path(ROOT / "appliance/fleet/gone.py").exists()


def test_the_readme_and_the_operations_doc_link_the_threat_model():
    assert "](docs/security.md)" in (ROOT / "README.md").read_text()
    assert "](security.md)" in (ROOT / "docs" / "operations.md").read_text()
