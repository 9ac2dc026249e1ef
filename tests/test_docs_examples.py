"""The docs' code stays in step with the API: every ```python block of README.md and docs/*.md
parses, its imports resolve, the jaxcomp attributes it uses exist, and its calls of jaxcomp
functions fit their signatures (number of positional arguments, keyword names).

The blocks are fragments of a page (they build on each other and leave the training loop to the
reader), so they are checked statically, page by page, not run: running them is what a review
does (see the stop notes); this test catches the drift between a rename and the docs.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
REFERENCE = re.compile(r"`(jaxcomp(?:\.\w+)+)")


def _blocks(page: pathlib.Path) -> list[tuple[int, str]]:
    text = page.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in BLOCK.finditer(text)]


def _resolve(dotted: str):
    """The object a dotted name refers to: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _dotted(node: ast.AST) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None for anything that is not a plain attribute chain."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(names)]


def _check_call(obj, call: ast.Call, where: str) -> str | None:
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*call.args, **{k.arg: k.value for k in call.keywords})
    except TypeError as e:
        return f"{where}: {ast.unparse(call)[:80]}: {e}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_code_fits_the_api(page):
    problems = []
    # Python in any other fence (```py, indented under a list item) would not be checked.
    for number, text in enumerate(page.read_text().splitlines(), 1):
        if re.match(r"\s*```\s*(py|python|python3|ipython|pycon)\b", text) and text != "```python":
            problems.append(f"{page.name}:{number}: write Python blocks as a column-0 ```python "
                            f"fence, got {text.strip()!r}")
    aliases: dict[str, object] = {}  # names the page's blocks imported so far, page order
    for line, code in _blocks(page):
        where = f"{page.name}:{line}"
        try:
            tree = ast.parse(code)
        except SyntaxError as e:
            problems.append(f"{where}: does not parse: {e}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module = importlib.import_module(alias.name)
                    if alias.asname:
                        aliases[alias.asname] = module
                    else:
                        top = alias.name.split(".")[0]
                        aliases[top] = importlib.import_module(top)
            elif isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    # As Python does: the package's attribute (jaxcomp.report, the function),
                    # else the submodule.
                    try:
                        value = getattr(module, alias.name)
                    except AttributeError:
                        try:
                            value = importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            problems.append(f"{where}: {node.module} has no {alias.name}")
                            continue
                    aliases[alias.asname or alias.name] = value
        for node in ast.walk(tree):
            chain = _dotted(node.func if isinstance(node, ast.Call) else node)
            if not chain or chain[0] not in aliases or not isinstance(node, (ast.Call, ast.Attribute)):
                continue
            obj = aliases[chain[0]]
            if not (getattr(obj, "__module__", None) or getattr(obj, "__name__", "")).startswith(
                    "jaxcomp"):
                continue
            try:
                for name in chain[1:]:
                    obj = getattr(obj, name)
            except AttributeError:
                problems.append(f"{where}: {'.'.join(chain)} does not exist")
                continue
            if isinstance(node, ast.Call):
                problem = _check_call(obj, node, where)
                if problem:
                    problems.append(problem)
    for reference in sorted(set(REFERENCE.findall(page.read_text()))):
        try:
            _resolve(reference)
        except (ImportError, AttributeError):
            problems.append(f"{page.name}: `{reference}` does not exist")
    assert not problems, "\n".join(dict.fromkeys(problems))
