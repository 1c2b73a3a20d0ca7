"""The code in the docs is real: runnable pages run as written, every other Python block parses."""

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Pages whose Python blocks, concatenated in order, form one self-contained program.
RUNNABLE = ["getting-started.md", "concepts/state.md", "concepts/randomness.md", "concepts/optimizers.md"]
# Steps run eagerly here: the snippets are what is checked (the compiled path is covered by the
# step tests), and a compile per page would cost minutes on a small CPU. The page's code is
# run unchanged; only the factories' default is switched.
EAGER = """\
import functools as _functools
import ftrain as _ftrain

for _name in ("make_train_step", "make_eval_step", "make_predict_step", "compile_step"):
    setattr(_ftrain, _name, _functools.partial(getattr(_ftrain, _name), compile=False))

"""
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)


def python_blocks(page: Path) -> list[str]:
    return [textwrap.dedent(m["body"]) for m in FENCE.finditer(page.read_text())]


def test_runnable_pages_exist_and_have_code():
    for name in RUNNABLE:
        assert python_blocks(DOCS / name), f"docs/{name} has no python blocks"


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md"))])
def test_every_python_block_parses(page):
    for i, block in enumerate(python_blocks(ROOT / page)):
        try:
            ast.parse(block)
        except SyntaxError as e:
            pytest.fail(f"{page}, python block {i}: {e}\n{block}")


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE)
def test_runnable_page_runs(page, tmp_path):
    script = tmp_path / "page.py"
    script.write_text(EAGER + "\n\n".join(python_blocks(DOCS / page)))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"docs/{page} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
