"""Architecture rules of the repository (issue 9).

These tests build no model and train nothing: they read files, parse them
with `ast`, or start a short Python subprocess. Each failure lists every
offending file and line, so one run shows all that is left to fix.

Rules:

* Nothing git would commit refers to a file outside the repository (the
  pitfalls the code works around are in `docs/pitfalls.md`).
* No module of the package imports or uses an underscore name of another
  module of the package. The package is `tf_breakeven/`, `models/` and
  `launch/`, installed as `tf_breakeven`, `tf_breakeven.models` and
  `tf_breakeven.launch`. Forbidden: `from tf_breakeven.x import _y`,
  `import tf_breakeven._x`, `from .x import _y`, imports from an underscore
  module such as `models._base`, `alias._name` or `getattr(alias, "_name")`
  where `alias` is a module of the package, and (matched by name, without
  type inference) `obj._name` where `_name` is a private member of a class
  of another package module, e.g. `kernel._hvp`. Dunder names
  (`__version__`) are public. Underscore names of third-party libraries
  (`keras.src...`, `model._flatten_layers`) are out of scope, and tests
  may use private names.
* `import tf_breakeven` leaves matplotlib unimported. The subprocess test
  is the criterion as a user sees it; the static test follows our own
  import-time imports. Importing `tf_breakeven.plotting` does not switch
  matplotlib's backend.
* In `tf_breakeven/`, no class is longer than `MAX_CLASS_LINES` lines and
  no function or method longer than `MAX_FUNCTION_LINES`. Lines are counted
  from the `class`/`def` line to the last line of the body. A longer one
  is allowed only if its docstring says why, with a sentence that starts
  "This class is long because", "This function is long because" or "This
  method is long because".
* (`-m slow`) The wheel built by `pip wheel .` has one top-level package,
  `tf_breakeven`, with the model zoo and the launchers inside it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Repository folder -> the import package it installs as.
PACKAGE_DIRS = {
    "tf_breakeven": "tf_breakeven",
    "models": "tf_breakeven.models",
    "launch": "tf_breakeven.launch",
}
# Until the move is finished the folders are also importable under their
# own top-level names; both spellings name the same module.
LEGACY_NAMES = {
    "models": "tf_breakeven.models",
    "launch": "tf_breakeven.launch",
}
# Folders whose definitions must stay short.
SIZE_CHECKED_DIRS = ("tf_breakeven",)
MAX_CLASS_LINES = 150
MAX_FUNCTION_LINES = 60
LONG_BECAUSE = re.compile(r"\bThis (class|function|method) is long because\b")
# References to files outside the repository (built so that this file
# does not contain them literally).
OUTSIDE_REFERENCES = ("TRAPS" + ".md", "../" + "shared", "/work/" + "shared")
SUBPROCESS_TIMEOUT = 120


def _report(title: str, problems: list[str]) -> str:
    return f"{title} ({len(problems)}):\n  " + "\n  ".join(problems)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (
        name.startswith("__") and name.endswith("__")
    )


# ------------------------------------------------------------ file discovery


def _git_files() -> list[Path]:
    """Files git tracks or would add (not ignored), relative to REPO."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    names = result.stdout.decode("utf-8").split("\0")
    return sorted(Path(n) for n in names if n and (REPO / n).is_file())


def _package_files(dirs=tuple(PACKAGE_DIRS)) -> Iterator[Path]:
    """Python files of the package folders, relative to REPO."""
    for folder in dirs:
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO)
            if "__pycache__" not in relative.parts:
                yield relative


def _parse(path: Path) -> ast.Module:
    return ast.parse((REPO / path).read_text(encoding="utf-8"), str(path))


# ------------------------------------------------------------ module names


def _module_name(path: Path) -> str:
    """The installed module name of a package file, e.g.
    `models/lstm.py` -> `tf_breakeven.models.lstm`."""
    folder, *rest = path.with_suffix("").parts
    parts = PACKAGE_DIRS[folder].split(".") + rest
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _canonical(name: str | None) -> str | None:
    """The installed name of one of our modules, or None if not ours."""
    if not name:
        return None
    top, _, rest = name.partition(".")
    if top in LEGACY_NAMES:
        name = LEGACY_NAMES[top] + ("." + rest if rest else "")
    if name == "tf_breakeven" or name.startswith("tf_breakeven."):
        return name
    return None


def _module_path(name: str) -> Path | None:
    """The file (relative to REPO) of our installed module `name`."""
    for folder, package in sorted(
        PACKAGE_DIRS.items(), key=lambda item: -len(item[1])
    ):
        if name == package or name.startswith(package + "."):
            rest = (
                name[len(package) + 1 :].split(".") if name != package else []
            )
            base = Path(folder, *rest)
            if (REPO / base / "__init__.py").is_file():
                return base / "__init__.py"
            if rest and (REPO / base.with_suffix(".py")).is_file():
                return base.with_suffix(".py")
            return None
    return None


def _module_exists(name: str) -> bool:
    """Whether the installed module `name` is a file or package of ours."""
    return _module_path(name) is not None


def _resolve_relative(path: Path, module: str | None, level: int) -> str:
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


# ------------------------------------------------------------ private names


class _PrivateUse(ast.NodeVisitor):
    """Finds uses of underscore names of other modules of the package."""

    def __init__(self, path: Path, tree: ast.Module):
        self.path = path
        self.self_name = _module_name(path)
        self.problems: list[str] = []
        # Local name -> our module it is bound to, anywhere in the file.
        self.modules: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                self._bind_import(node)
            elif isinstance(node, ast.ImportFrom):
                self._bind_import_from(node)

    def _problem(self, node: ast.AST, message: str) -> None:
        self.problems.append(f"{self.path}:{node.lineno}: {message}")

    def _bind_import(self, node: ast.Import) -> None:
        for alias in node.names:
            name = _canonical(alias.name)
            if name is None:
                continue
            if alias.asname:
                self.modules[alias.asname] = name
            else:
                top = alias.name.partition(".")[0]
                self.modules[top] = _canonical(top)

    def _source(self, node: ast.ImportFrom) -> str | None:
        if node.level:
            return _resolve_relative(self.path, node.module, node.level)
        return _canonical(node.module)

    def _bind_import_from(self, node: ast.ImportFrom) -> None:
        source = self._source(node)
        if source is None:
            return
        for alias in node.names:
            if _module_exists(f"{source}.{alias.name}"):
                self.modules[alias.asname or alias.name] = (
                    f"{source}.{alias.name}"
                )

    def _resolve(self, node: ast.AST) -> str | None:
        """Our module an expression names (`alias`, `alias.sub`), or None."""
        if isinstance(node, ast.Name):
            return self.modules.get(node.id)
        if isinstance(node, ast.Attribute):
            parent = self._resolve(node.value)
            if parent and _module_exists(f"{parent}.{node.attr}"):
                return f"{parent}.{node.attr}"
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            name = _canonical(alias.name)
            if name and any(_is_private(p) for p in name.split(".")):
                self._problem(node, f"imports private module `{alias.name}`")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = self._source(node)
        if source is None:
            return
        spelled = "." * node.level + (node.module or "")
        if any(_is_private(p) for p in source.split(".")):
            self._problem(
                node, f"imports from private module `{spelled}` ({source})"
            )
        for alias in node.names:
            if _is_private(alias.name):
                self._problem(
                    node,
                    f"imports private name `{alias.name}` from `{spelled}`",
                )

    def visit_Attribute(self, node: ast.Attribute) -> None:
        module = self._resolve(node.value)
        if module and module != self.self_name and _is_private(node.attr):
            self._problem(
                node, f"uses private name `{node.attr}` of module `{module}`"
            )
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        # getattr(module, "_name") is the same access, spelled dynamically.
        if (
            isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _is_private(node.args[1].value)
        ):
            module = self._resolve(node.args[0])
            if module and module != self.self_name:
                self._problem(
                    node,
                    f"{node.func.id}() of private name "
                    f"`{node.args[1].value}` of module `{module}`",
                )
        self.generic_visit(node)


def _private_members(tree: ast.Module) -> set[str]:
    """Underscore names a module defines: module level and in its classes
    (methods, class attributes, `self._x = ...`)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        ):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(
            node.ctx, ast.Store
        ):
            names.add(node.attr)
    return {name for name in names if _is_private(name)}


def _class_members(tree: ast.Module) -> set[str]:
    """Underscore members of the classes a module defines."""
    names: set[str] = set()
    for cls in ast.walk(tree):
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(
                node.ctx, ast.Store
            ):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {name for name in names if _is_private(name)}


def test_no_module_uses_private_names_of_another_module():
    problems = []
    for path in _package_files():
        visitor = _PrivateUse(path, tree := _parse(path))
        visitor.visit(tree)
        problems += visitor.problems
    assert not problems, _report(
        "Package modules using underscore names of other package modules; "
        "make the name public (drop the underscore, document it) or move "
        "the code that needs it",
        problems,
    )


def test_no_module_uses_private_members_of_another_modules_classes():
    """`obj._name` where `_name` is a private member of a class of another
    package module (e.g. `kernel._hvp`) and is not defined in the module
    that uses it. No types are inferred: `_name` is matched by name, and
    `self._name` / `cls._name` never count."""
    trees = {path: _parse(path) for path in _package_files()}
    owners: dict[str, set[str]] = {}
    for path, tree in trees.items():
        for name in _class_members(tree):
            owners.setdefault(name, set()).add(_module_name(path))
    problems = []
    for path, tree in trees.items():
        own = _private_members(tree)
        this = _module_name(path)
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Load)
                and _is_private(node.attr)
                and node.attr not in own
            ):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and getattr(
                value.func, "id", None
            ) in ("super", "type"):
                continue
            others = sorted(owners.get(node.attr, set()) - {this})
            if others:
                problems.append(
                    f"{path}:{node.lineno}: uses `{ast.unparse(node)}`, a "
                    f"private member of a class in {', '.join(others)}"
                )
    assert not problems, _report(
        "Package modules using private members of other modules' classes; "
        "give the class a public method or attribute for it",
        problems,
    )


def _fake_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_the_private_name_checks_find_every_pattern(tmp_path, monkeypatch):
    """The two checks above on a fake package: each line marked `# bad`
    is reported once, nothing else is."""
    user = """
        import keras
        import tf_breakeven as tfb
        import tf_breakeven._hidden  # bad
        from tf_breakeven import __version__, a
        from tf_breakeven.a import _y  # bad
        from tf_breakeven.models._base import Z  # bad
        from models._base import Z  # bad
        from . import a as alias
        from .a import _y, public  # bad


        class Mine:
            def _own(self):
                return self._state


        def use(model, kernel, other):
            a._z()  # bad
            tfb.a._z  # bad
            alias._q  # bad
            getattr(a, "_z")  # bad
            kernel._hvp()  # bad
            a.__doc__, keras.src, model._flatten_layers, other._own()
    """
    _fake_package(
        tmp_path,
        {
            "tf_breakeven/__init__.py": "__version__ = '0'\n",
            "tf_breakeven/a.py": """
                class Kernel:
                    def _hvp(self):
                        pass
            """,
            "tf_breakeven/_hidden.py": "",
            "tf_breakeven/b.py": user,
            "models/__init__.py": "",
            "models/_base.py": "Z = 1\n",
        },
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    expected = [
        f"tf_breakeven/b.py:{number}"
        for number, line in enumerate(textwrap.dedent(user).splitlines(), 1)
        if line.endswith("# bad")
    ]
    found = []
    for check in (
        test_no_module_uses_private_names_of_another_module,
        test_no_module_uses_private_members_of_another_modules_classes,
    ):
        with pytest.raises(AssertionError) as error:
            check()
        found += [
            ":".join(line.strip().split(":")[:2])
            for line in str(error.value).splitlines()[1:]
            if line.strip().startswith("tf_breakeven/b.py:")
        ]
    assert len(expected) == 10
    assert sorted(found) == sorted(expected)


def test_the_size_check_honours_the_long_because_docstring(
    tmp_path, monkeypatch
):
    body = "    x = 1\n" * 60
    _fake_package(
        tmp_path,
        {
            "tf_breakeven/__init__.py": "",
            "tf_breakeven/sizes.py": (
                "def fits():\n"
                + "    x = 1\n" * 59
                + "def too_long():\n"
                + body
                + 'def explained():\n    """This function is long because'
                ' it must be."""\n' + body
            ),
        },
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError) as error:
        test_classes_and_functions_are_short_or_say_why_not()
    problems = str(error.value).splitlines()[1:]
    assert [p.strip().split(": ", 1)[1] for p in problems[:1]] == [
        "function `too_long` has 61 lines (limit 60)"
    ]
    assert "(1):" in str(error.value).splitlines()[0]


# ------------------------------------------------------------ references


def test_no_file_refers_to_files_outside_the_repository():
    problems = []
    for path in _git_files():
        try:
            text = (REPO / path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        for number, line in enumerate(text.splitlines(), 1):
            for needle in OUTSIDE_REFERENCES:
                if needle in line:
                    problems.append(
                        f"{path}:{number}: `{needle}`: {line.strip()[:100]}"
                    )
    assert not problems, _report(
        "References to files outside the repository; point to "
        "docs/pitfalls.md#P<n> (or another file in the repository) instead",
        problems,
    )


# ------------------------------------------------------------ sizes


def _definitions(
    tree: ast.Module,
) -> Iterator[tuple[str, ast.ClassDef | ast.FunctionDef]]:
    """Every class and function with its qualified name."""

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(
                child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            ):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def test_classes_and_functions_are_short_or_say_why_not():
    problems = []
    for path in _package_files(SIZE_CHECKED_DIRS):
        for name, node in _definitions(_parse(path)):
            is_class = isinstance(node, ast.ClassDef)
            limit = MAX_CLASS_LINES if is_class else MAX_FUNCTION_LINES
            length = node.end_lineno - node.lineno + 1
            if length <= limit:
                continue
            if LONG_BECAUSE.search(ast.get_docstring(node) or ""):
                continue
            kind = "class" if is_class else "function"
            problems.append(
                f"{path}:{node.lineno}: {kind} `{name}` has {length} lines "
                f"(limit {limit})"
            )
    assert not problems, _report(
        "Definitions over the size limits; split them, or say in the "
        'docstring why not: "This class/function/method is long because ..."',
        problems,
    )


# ------------------------------------------------------- import side effects


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


# One subprocess for both import checks (importing TensorFlow dominates
# their cost). It records where matplotlib is first imported from (the
# Python frames of the import chain, outermost first, without importlib's
# own), then imports (or, if `import tf_breakeven` already did, reloads)
# `tf_breakeven.plotting` with the backend set to svg and reports the
# backend afterwards.
_IMPORT_PROBE = """
import importlib, json, sys, traceback

class Spy:
    chain = None

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "matplotlib" and Spy.chain is None:
            Spy.chain = [
                f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                for f in traceback.extract_stack()[:-1]
                if not f.filename.startswith("<")
            ]
        return None

sys.meta_path.insert(0, Spy())
import tf_breakeven
result = {"matplotlib": "matplotlib" in sys.modules, "chain": Spy.chain}
import matplotlib
matplotlib.use("svg")
if "tf_breakeven.plotting" in sys.modules:
    importlib.reload(sys.modules["tf_breakeven.plotting"])
else:
    import tf_breakeven.plotting
result["backend"] = matplotlib.get_backend().lower()
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def import_probe() -> dict:
    result = _run_python(_IMPORT_PROBE)
    lines = [
        line[len("RESULT ") :]
        for line in result.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    assert result.returncode == 0 and lines, (
        "`import tf_breakeven` or `import tf_breakeven.plotting` failed:\n"
        + result.stderr[-3000:]
    )
    return json.loads(lines[-1])


# The literal criterion (`'matplotlib' not in sys.modules` after
# `import tf_breakeven`) cannot hold while matplotlib is installed: Keras
# 3.15 itself imports `matplotlib.pyplot` in `import keras`
# (keras/src/visualization/plot_image_gallery.py, inside a try/except
# ImportError). So the check is run as on a machine without matplotlib: a
# meta-path finder refuses every matplotlib import and records who asked.
# Keras shrugs it off; `import tf_breakeven` must succeed and none of our
# files may have asked.
_BLOCKED_PROBE = """
import json, sys, traceback

class Block:
    askers = []

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "matplotlib":
            Block.askers.append([
                f"{f.filename}:{f.lineno}"
                for f in traceback.extract_stack()[:-1]
                if not f.filename.startswith("<")
            ])
            raise ImportError(f"{name} blocked by the test")
        return None

sys.meta_path.insert(0, Block())
import tf_breakeven
print("RESULT " + json.dumps(Block.askers))
"""


def test_importing_the_library_does_not_import_matplotlib():
    result = _run_python(_BLOCKED_PROBE)
    lines = [
        line[len("RESULT ") :]
        for line in result.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    assert result.returncode == 0 and lines, (
        "`import tf_breakeven` failed without matplotlib:\n"
        + result.stderr[-3000:]
    )
    # The last frame of a chain is the import statement that asked.
    ours = [
        chain[-1]
        for chain in json.loads(lines[-1])
        if chain and chain[-1].startswith(str(REPO) + os.sep)
    ]
    assert not ours, (
        "importing tf_breakeven asked for matplotlib from our own files:\n  "
        + "\n  ".join(ours)
    )


def test_importing_plotting_keeps_the_matplotlib_backend(import_probe):
    assert import_probe["backend"] == "svg", (
        "importing tf_breakeven.plotting switched matplotlib's backend from "
        f"'svg' to {import_probe['backend']!r}; use matplotlib.figure.Figure "
        "(no pyplot state) instead of matplotlib.use()"
    )


def _import_time_statements(tree: ast.Module) -> Iterator[ast.stmt]:
    """Import statements that run when the module is imported: all but
    those inside function bodies."""

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            yield from walk(child)

    yield from walk(tree)


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imported_modules(path: Path, node: ast.stmt) -> list[str]:
    """Every module (ours or not) an import statement loads."""
    if isinstance(node, ast.Import):
        names = [_canonical(a.name) or a.name for a in node.names]
        return [m for name in names for m in _with_parents(name)]
    if node.level:
        source = _resolve_relative(path, node.module, node.level)
    else:
        source = _canonical(node.module) or node.module or ""
    submodules = [
        f"{source}.{a.name}"
        for a in node.names
        if _module_exists(f"{source}.{a.name}")
    ]
    return _with_parents(source) + submodules


def test_no_library_module_imports_matplotlib_at_import_time():
    """Follows the import-time imports from `tf_breakeven` through our own
    modules; none of them may import matplotlib. Modules loaded only on
    demand (e.g. by a module `__getattr__`) are not reached."""
    chains = {"tf_breakeven": ["tf_breakeven"]}
    queue = ["tf_breakeven"]
    problems = []
    while queue:
        module = queue.pop(0)
        path = _module_path(module)
        if path is None:
            continue
        for node in _import_time_statements(_parse(path)):
            names = _imported_modules(path, node)
            plotting = [n for n in names if n.partition(".")[0] == "matplotlib"]
            if plotting:
                problems.append(
                    f"{path}:{node.lineno}: imports `{max(plotting, key=len)}`"
                    f" (reached by {' -> '.join(chains[module])})"
                )
            for name in names:
                if _canonical(name) and name not in chains:
                    chains[name] = chains[module] + [name]
                    queue.append(name)
    assert not problems, _report(
        "Modules loaded by `import tf_breakeven` that import matplotlib; "
        "import it inside the functions that plot, or load the module "
        "lazily",
        problems,
    )


# ------------------------------------------------------------ wheel


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> list[str]:
    """File names in the wheel `pip wheel .` builds from a copy of what
    git would commit (so stale build/ folders cannot leak into it)."""
    source = tmp_path_factory.mktemp("source")
    for path in _git_files():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, source / path)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", out],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


@pytest.mark.slow
def test_wheel_has_one_top_level_package(wheel_files):
    tops = {
        name.split("/")[0].removesuffix(".py")
        for name in wheel_files
        if not name.split("/")[0].endswith((".dist-info", ".data"))
    }
    assert tops == {"tf_breakeven"}, (
        f"top-level packages/modules in the wheel: {sorted(tops)}; only "
        "tf_breakeven may be installed at the top level (install models/ "
        "and launch/ as tf_breakeven.models and tf_breakeven.launch)"
    )


@pytest.mark.slow
def test_wheel_holds_every_package_file_inside_tf_breakeven(wheel_files):
    installed = set(wheel_files)
    missing = []
    for path in _git_files():
        folder = path.parts[0]
        if folder in PACKAGE_DIRS and path.suffix == ".py":
            inside = PACKAGE_DIRS[folder].replace(".", "/")
            target = "/".join((inside, *path.parts[1:]))
            if target not in installed:
                missing.append(f"{path} (expected as {target})")
    assert not missing, _report("Package files missing from the wheel", missing)
