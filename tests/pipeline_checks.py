"""Static checks of dvc.yaml against the code: deps and params each stage needs, found with ast.

A stage's script is the ``python -m stages.X`` (or ``python stages/X.py``) of its cmd. Its
required deps are the script plus every ``pipeline`` module it imports, transitively
(``import pipeline.x``, ``from pipeline.x import y``, ``from pipeline import x``, relative
imports, imports inside functions, the ``__init__.py`` of each package on the way, the script's
own included). A package ``__init__.py`` brings what it imports at import time, not the
imports inside its functions; one that imports nothing at import time (a lazy ``__getattr__``,
names listed in an ``_EXPORTS`` literal) is not a dep itself; the modules its named attributes
come from are. A folder dep (``pipeline/sources``) stands for every module below it and is
exact only when the stage imports all of them. Its required params are the ``params.yaml``
keys subscripted on the result of ``load_params()``, directly (``load_params()["masks"]``) or
through a variable (``params = load_params(); params["train"]``), with one more level where the
first one is subscripted again (``params["models"][name]``).
"""

from __future__ import annotations

import ast
import shlex
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "pipeline"
DYNAMIC = "*"
EXPORTS = "_EXPORTS"  # a lazy package's literal {submodule: (exported names)}


@dataclass
class StageInfo:
    """What the checks need of one (expanded) dvc stage: plain data, easy to modify in tests."""

    name: str
    cmd: str
    deps: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)


def stages_from_repo(root: Path) -> list[StageInfo]:
    """Every stage of the repository, foreach stages expanded (``train@mobilenet_attention``)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    infos = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            deps, params = [], []
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    params.extend(dep.params)
                else:
                    deps.append(str(dep.def_path))
            infos.append(StageInfo(stage.name, stage.cmd, deps, params))
    return infos


def script_of(cmd: str) -> tuple[str, list[str]]:
    """``python -m stages.train m1`` (or ``stages/train.py m1``) -> ("stages/train.py", ["m1"])."""
    words = shlex.split(cmd)
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words):
            return f"{words[i + 1].replace('.', '/')}.py", words[i + 2:]
        if word.endswith(".py"):
            return word, words[i + 1:]
    raise ValueError(f"no python script or module in cmd {cmd!r}")


def _module_file(root: Path, dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    as_file = Path(*parts).with_suffix(".py")
    as_package = Path(*parts) / "__init__.py"
    for candidate in (as_file, as_package):
        if (root / candidate).is_file():
            return candidate.as_posix()
    return None


def _package_of(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    return ".".join(parts[:-1])


def _parent_inits(root: Path, module_file: str) -> set[str]:
    """The ``__init__.py`` of every package above ``module_file`` (Python runs them first)."""
    parents = Path(module_file).parents
    return {(folder / "__init__.py").as_posix() for folder in parents
            if folder != Path(".") and (root / folder / "__init__.py").is_file()}


def is_lazy_init(root: Path, path: str) -> bool:
    """Whether ``path`` is a package ``__init__.py`` importing no ``pipeline`` module at import
    time (its imports, if any, sit inside functions: a lazy ``__getattr__``)."""
    if Path(path).name != "__init__.py":
        return False
    tree = ast.parse((root / path).read_text(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.Import) and any(
                alias.name.split(".")[0] == PACKAGE for alias in node.names):
            return False
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[
                0] == PACKAGE):
            return False
    return True


def _lazy_attributes(root: Path, init_file: str) -> dict[str, str]:
    """A lazy package's attributes: name -> module file it is imported from on first use.

    Found in the ``__getattr__`` imports (``from pipeline.predict import predict``) and in an
    ``_EXPORTS = {"submodule": ("name", ...)}`` literal.
    """
    tree = ast.parse((root / init_file).read_text())
    package = _package_of(init_file)
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            target = _module_file(root, node.module)
            if target:
                for alias in node.names:
                    found[alias.asname or alias.name] = target
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and EXPORTS in {
                t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)}:
            for submodule, names in ast.literal_eval(node.value).items():
                target = _module_file(root, f"{package}.{submodule}")
                found.update(dict.fromkeys(names, target))
    return found


def _bound_module(root: Path, module_file: str) -> set[str]:
    """A module bound to a name: a lazy package brings every module its attributes come from
    (which of them the code then uses is not followed)."""
    if is_lazy_init(root, module_file):
        return {module_file, *_lazy_attributes(root, module_file).values()}
    return {module_file}


def _import_nodes(tree: ast.Module, path: str) -> list[ast.AST]:
    """The nodes to look for imports in: all of a module; of a package ``__init__.py``, what
    runs at import (a lazy ``__getattr__``'s imports are followed by name, where used)."""
    if Path(path).name != "__init__.py":
        return list(ast.walk(tree))
    return [node for statement in tree.body
            if not isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(statement)]


def imported_modules(root: Path, path: str) -> set[str]:
    """Files of the ``pipeline`` modules that ``path`` imports directly (anywhere in the file)."""
    tree = ast.parse((root / path).read_text(), filename=path)
    found: set[str] = set()
    for node in _import_nodes(tree, path):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _module_file(root, alias.name)
                if target:
                    found |= _bound_module(root, target) | _parent_inits(root, target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path).split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            target = _module_file(root, module)
            if target is None:
                continue
            found |= {target} | _parent_inits(root, target)
            for alias in node.names:  # from pipeline import plots  (a submodule)
                sub = _module_file(root, f"{module}.{alias.name}")
                if sub:
                    found |= _bound_module(root, sub)
                elif target.endswith("__init__.py"):  # from pipeline import predict (lazy attr)
                    lazy = _lazy_attributes(root, target).get(alias.name)
                    if lazy:
                        found.add(lazy)
    return found


def module_closure(root: Path, script: str) -> set[str]:
    """The script and every ``pipeline`` module it imports, transitively."""
    seen: set[str] = set()
    todo = [script, *_parent_inits(root, script)]  # python -m stages.x runs stages/__init__.py
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if not is_lazy_init(root, path):  # its imports are lazy; named attributes are followed
            todo.extend(imported_modules(root, path) - seen)
    return seen


def _folder_modules(root: Path, folder: str) -> set[str]:
    """Every module file below a folder dep (``pipeline/sources``), lazy ``__init__`` aside."""
    files = {path.relative_to(root).as_posix() for path in (root / folder).rglob("*.py")}
    return {path for path in files if not is_lazy_init(root, path)}


def _check_deps(root: Path, stage: StageInfo, script: str, modules: set[str]) -> list[str]:
    """Missing module deps, and module or folder deps the stage does not import."""
    deps = {Path(d).as_posix() for d in stage.deps}
    folders = {dep: _folder_modules(root, dep) for dep in sorted(deps)
               if dep.startswith(f"{PACKAGE}/") and (root / dep).is_dir()}
    covered = deps.union(*folders.values())
    problems = [f"stage {stage.name}: missing dep {module} (imported by {script})"
                for module in sorted(modules - covered)]
    problems += [f"stage {stage.name}: dep {dep} is not imported by {script}"
                 for dep in sorted(deps) if dep.endswith(".py") and dep not in modules]
    for folder, inside in folders.items():
        problems += [f"stage {stage.name}: dep {folder} holds {module}, not imported by {script}"
                     for module in sorted(inside - modules)]
    return problems


def _is_load_params(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == "load_params") or (
        isinstance(func, ast.Attribute) and func.attr == "load_params")


def params_read(root: Path, path: str) -> set[tuple[str, str | None]]:
    """(key, subkey) pairs read from ``load_params()``; subkey is None, a name, or DYNAMIC."""
    tree = ast.parse((root / path).read_text(), filename=path)
    parents: dict[ast.AST, ast.AST] = {}
    holders: set[str] = set()
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
        if isinstance(node, ast.Assign) and _is_load_params(node.value):
            holders.update(t.id for t in node.targets if isinstance(t, ast.Name))
    reads: set[tuple[str, str | None]] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Subscript):
            continue
        base = node.value
        if not (_is_load_params(base) or (isinstance(base, ast.Name) and base.id in holders)):
            continue
        if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            reads.add((DYNAMIC, None))  # params[variable]: cannot be checked statically
            continue
        sub: str | None = None
        parent = parents.get(node)
        if isinstance(parent, ast.Subscript) and parent.value is node:
            inner = parent.slice
            if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                sub = inner.value
            else:
                sub = DYNAMIC
        reads.add((node.slice.value, sub))
    # a bare ``load_params()`` passed on whole (not subscripted, not assigned) reads everything
    for node in ast.walk(tree):
        if _is_load_params(node):
            parent = parents.get(node)
            if not (isinstance(parent, ast.Subscript) and parent.value is node) and not (
                    isinstance(parent, ast.Assign)):
                reads.add((DYNAMIC, None))
    for holder in holders:
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == holder and isinstance(node.ctx, ast.Load):
                parent = parents.get(node)
                if not (isinstance(parent, ast.Subscript) and parent.value is node):
                    reads.add((DYNAMIC, None))  # params passed on whole
    return reads


def _covers(entry: str, key: str, sub: str | None, args: list[str]) -> bool:
    """Whether params entry ``entry`` of the stage covers the read (key, sub)."""
    if entry == key:
        return True
    if sub is None or not entry.startswith(f"{key}."):
        return False
    listed = entry[len(key) + 1:]
    return listed == sub or (sub == DYNAMIC and listed in args)


def check_stage(root: Path, stage: StageInfo) -> list[str]:
    """Problems of one stage, each a message naming the stage and the module or key."""
    script, args = script_of(stage.cmd)
    modules = {path for path in module_closure(root, script) if not is_lazy_init(root, path)}
    problems = _check_deps(root, stage, script, modules)

    reads: set[tuple[str, str | None]] = set()
    for module in modules:
        reads |= params_read(root, module)
    if (DYNAMIC, None) in reads:
        problems.append(f"stage {stage.name}: reads params dynamically; cannot check them")
        reads.discard((DYNAMIC, None))
    for key, sub in sorted(reads, key=str):
        if not any(_covers(entry, key, sub, args) for entry in stage.params):
            shown = key if sub is None else f"{key}[{sub if sub != DYNAMIC else args}]"
            problems.append(f"stage {stage.name}: reads params key {shown} not in its params")
    for entry in stage.params:
        if not any(_covers(entry, key, sub, args) for key, sub in reads):
            problems.append(f"stage {stage.name}: params key {entry} is listed but never read")
    return problems
