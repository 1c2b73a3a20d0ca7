"""The docs build with warnings as errors, and no public name goes undocumented."""

import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import ftrain

ROOT = Path(__file__).resolve().parent.parent


def _public_names():
    """(qualified name, object) for every public ftrain name: top-level names and submodule members."""
    for name in sorted(vars(ftrain)):
        if name.startswith("_"):
            continue
        obj = getattr(ftrain, name)
        if isinstance(obj, types.ModuleType):
            if not obj.__name__.startswith("ftrain."):
                continue
            yield f"ftrain.{name}", obj
            for member in getattr(obj, "__all__", [n for n in vars(obj) if not n.startswith("_")]):
                value = getattr(obj, member)
                if getattr(value, "__module__", "").startswith("ftrain") and callable(value):
                    yield f"ftrain.{name}.{member}", value
        elif callable(obj):
            yield f"ftrain.{name}", obj


@pytest.mark.parametrize("qualname,obj", list(_public_names()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_name_has_docstring(qualname, obj):
    doc = inspect.getdoc(obj)
    assert doc and len(doc.strip()) > 20, f"{qualname} has no real docstring"


def test_every_public_top_level_name_is_in_the_api_reference():
    api = (ROOT / "docs" / "api.md").read_text()
    documented = {line.split()[1] for line in api.splitlines() if line.startswith("::: ")}
    top_level = [q for q, _ in _public_names() if q.count(".") == 1]
    missing = [q for q in top_level if q not in documented]
    assert not missing, f"add these to docs/api.md: {missing}"


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="docs dependencies are part of the 'test' extra")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
