"""Imports point one way, down the layers of LAYERS: base -> backbones -> data -> methods -> decoding -> recipe -> eval ->
runner -> commands -> cli.

An AST scan of every module under plrm/ (imports inside functions included) checks three rules, and each failure
names the file and line:

- a module imports modules of its own layer or of lower ones only;
- no module uses another module's underscore names (``from plrm.x import _y``, or ``x._y`` on an imported module);
- no import cycle between plrm modules. Imports inside functions count: a cycle closed lazily is still a cycle
  of the design (bench/run <-> bench/report was one).

The one documented exception is the registry's lazy loading of the built-ins (REGISTRY_EXCEPTION).
The last test plants each kind of violation in a fake tree and checks that the same checker reports it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "plrm"

# Layer order, lowest first: a module may import its own layer or a lower one. A module is placed by the longest
# prefix (a module name or a package above it) that matches it; the package's own __init__ is ``plrm`` and matches
# nothing else. A new module that matches no row fails test_every_module_has_a_layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("plrm", "plrm.config", "plrm.errors", "plrm.items", "plrm.lazy", "plrm.catalog", "plrm.distributed", "plrm.checkpoint",
              "plrm.capabilities", "plrm.registry", "plrm.tracking")),
    ("backbones", ("plrm.backbones",)),
    ("data", ("plrm.data",)),
    ("methods", ("plrm.methods",)),
    ("decoding", ("plrm.decoding",)),  # reward-guided decoding: a policy LM and a method's reward (guides)
    # recipe.py imports the base layer (and, for annotations only, the dataset and backbone base classes), but
    # through the registry it validates the Config of a dataset, a backbone and every method, and build_dataset /
    # load_source build a dataset and the item encoder it asks for: it assembles all three kinds of component,
    # so it sits above them. Only the runner and the commands import it.
    ("recipe", ("plrm.recipe",)),
    ("eval", ("plrm.eval",)),  # protocol, metrics, report, plots, active (the active-learning session), profile
    ("runner", ("plrm.runner", "plrm.rundir", "plrm.resume")),  # the run directory and its training checkpoints
    ("commands", ("plrm.bench", "plrm.tax", "plrm.export")),
    ("cli", ("plrm.cli",)),
]

# The registry's lazy loading of the built-ins, the one exception to the layer order: Registry checks an entry's
# base class (imported on first use by _method_base, _dataset_base, _backbone_base) and ensure_builtins() imports
# the built-in packages so their @register decorators run. Every built-in module imports the registry to register
# itself, so these imports must stay inside functions: at module level each would be a real import cycle.
REGISTRY_EXCEPTION: frozenset[tuple[str, str]] = frozenset({
    ("plrm.registry", "plrm.methods.base"),    # _method_base
    ("plrm.registry", "plrm.data.source"),     # _dataset_base
    ("plrm.registry", "plrm.backbones.base"),  # _backbone_base
    ("plrm.registry", "plrm.backbones"),       # ensure_builtins
    ("plrm.registry", "plrm.data"),            # ensure_builtins
    ("plrm.registry", "plrm.methods"),         # ensure_builtins
})


# ---- the scan ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    """One import of a plrm module by another."""

    file: str      # path relative to the scanned root, e.g. plrm/bench/run.py
    line: int
    importer: str  # plrm.bench.run
    imported: str  # the module loaded: plrm.bench.report (``from plrm.eval import report`` -> plrm.eval.report)
    lazy: bool     # inside a function body


@dataclass(frozen=True)
class PrivateUse:
    """An underscore name of another module: ``from plrm.x import _y`` or ``x._y``."""

    file: str
    line: int
    importer: str
    module: str
    name: str


@dataclass
class Scan:
    modules: dict[str, str]  # module name -> file, relative to the root
    imports: list[Import]
    private_uses: list[PrivateUse]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def longest_module(name: str, modules: dict[str, str]) -> str | None:
    """``name`` if it is a module, else the nearest package or module above it that exists."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


class _Visitor(ast.NodeVisitor):
    """Imports (with their function depth) and module aliases of one file, then underscore attribute uses."""

    def __init__(self, file: str, importer: str, modules: dict[str, str]):
        self.file, self.importer, self.modules = file, importer, modules
        self.package = importer if file.endswith("__init__.py") else importer.rpartition(".")[0]
        self.depth = 0
        self.imports: list[Import] = []
        self.private_uses: list[PrivateUse] = []
        self.aliases: dict[str, str] = {}  # local name -> plrm module it is bound to

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, line: int, imported: str) -> None:
        self.imports.append(Import(self.file, line, self.importer, imported, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] != PACKAGE:
                continue
            target = longest_module(alias.name, self.modules) or alias.name
            self._add(node.lineno, target)
            if alias.asname:
                self.aliases[alias.asname] = target
            else:
                self.aliases[PACKAGE] = PACKAGE  # `import plrm.a.b` binds `plrm`

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from . import x / from ..a import b
            anchor = self.package.split(".")
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        if base.split(".")[0] != PACKAGE:
            return
        source = longest_module(base, self.modules) or base
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            target = submodule if submodule in self.modules else source
            self._add(node.lineno, target)
            if submodule in self.modules:
                self.aliases[alias.asname or alias.name] = submodule
            if is_private(alias.name) and target != self.importer:
                self.private_uses.append(PrivateUse(self.file, node.lineno, self.importer, source, alias.name))

    def check_attributes(self, tree: ast.AST) -> None:
        """``alias._name`` and ``plrm.a.b._name`` where the alias is an imported plrm module."""
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            chain = [node.attr]
            value = node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if not isinstance(value, ast.Name) or value.id not in self.aliases:
                continue
            module = self.aliases[value.id]
            for part in chain:
                if f"{module}.{part}" in self.modules:
                    module = f"{module}.{part}"
                    continue
                if is_private(part) and module != self.importer:
                    self.private_uses.append(PrivateUse(self.file, node.lineno, self.importer, module, part))
                break


def scan(root: Path) -> Scan:
    """Every import of a plrm module by a module under ``root/plrm``."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(f.relative_to(root)): str(f.relative_to(root)) for f in files}
    imports: list[Import] = []
    private: set[PrivateUse] = set()
    for name, file in modules.items():
        tree = ast.parse((root / file).read_text(), filename=file)
        visitor = _Visitor(file, name, modules)
        visitor.visit(tree)
        visitor.check_attributes(tree)
        imports += visitor.imports
        private.update(visitor.private_uses)
    return Scan(modules, imports, sorted(private, key=lambda p: (p.file, p.line, p.name)))


# ---- the three rules ---------------------------------------------------------------------------------------------
def layer_of(module: str) -> int | None:
    best, layer = -1, None
    for number, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != PACKAGE and module.startswith(prefix + "."))
            if matches and len(prefix) > best:
                best, layer = len(prefix), number
    return layer


def describe(module: str) -> str:
    layer = layer_of(module)
    return f"{module} (layer {layer} {LAYERS[layer][0]})" if layer is not None else f"{module} (no layer)"


def unplaced_modules(result: Scan) -> list[str]:
    return [f"{file}: module {name} matches no row of LAYERS in tests/test_layers.py; add it to its layer"
            for name, file in result.modules.items() if layer_of(name) is None]


def upward_imports(result: Scan) -> list[str]:
    problems = []
    for imp in result.imports:
        low, high = layer_of(imp.importer), layer_of(imp.imported)
        if low is None or high is None or high <= low:
            continue
        if (imp.importer, imp.imported) in REGISTRY_EXCEPTION and imp.lazy:
            continue
        why = " (the registry exception holds only inside a function)" if \
            (imp.importer, imp.imported) in REGISTRY_EXCEPTION else ""
        problems.append(f"{imp.file}:{imp.line}: {describe(imp.importer)} imports {describe(imp.imported)}, a higher "
                        f"layer{why}; a module may import its own layer or lower ones (tests/test_layers.py LAYERS)")
    return problems


def private_name_uses(result: Scan) -> list[str]:
    return [f"{use.file}:{use.line}: {use.importer} uses {use.module}.{use.name}, an underscore name of another "
            "module; make it public (with a docstring) in its own module, or keep it where it is used"
            for use in result.private_uses]


def import_cycles(result: Scan) -> list[str]:
    """One message per strongly connected group of modules, showing one cycle through it edge by edge."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in result.imports:
        if imp.importer == imp.imported or (imp.lazy and (imp.importer, imp.imported) in REGISTRY_EXCEPTION):
            continue
        edges.setdefault(imp.importer, {}).setdefault(imp.imported, imp)
    problems = []
    for group in strongly_connected(edges):
        if len(group) < 2:
            continue
        start = min(group)
        path = cycle_through(start, edges, group)
        steps = [edges[a][b] for a, b in zip(path, path[1:])]
        shown = "; ".join(f"{s.file}:{s.line} {s.importer} -> {s.imported}" for s in steps)
        problems.append(f"{steps[0].file}:{steps[0].line}: import cycle {' -> '.join(path)}: {shown}")
    return problems


def strongly_connected(edges: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[set[str]] = []
    nodes = sorted(set(edges) | {b for targets in edges.values() for b in targets})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                groups.append(group)
    return groups


def cycle_through(start: str, edges: dict[str, dict[str, Import]], group: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside ``group`` (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges.get(node, {})):
                if child not in group:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parent:
                    parent[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


# ---- the package ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def package() -> Scan:
    return scan(ROOT)


def test_every_module_has_a_layer(package):
    problems = unplaced_modules(package)
    assert not problems, "\n".join(problems)


def test_imports_point_down_the_layers(package):
    problems = upward_imports(package)
    assert not problems, f"{len(problems)} upward import(s):\n" + "\n".join(problems)


def test_no_module_uses_another_modules_underscore_names(package):
    problems = private_name_uses(package)
    assert not problems, f"{len(problems)} use(s) of another module's underscore names:\n" + "\n".join(problems)


def test_no_import_cycle(package):
    problems = import_cycles(package)
    assert not problems, f"{len(problems)} import cycle(s):\n" + "\n".join(problems)


def test_the_registry_exception_lists_only_imports_that_exist(package):
    """A stale exception would silently allow a future upward import."""
    seen = {(imp.importer, imp.imported) for imp in package.imports if imp.lazy}
    assert REGISTRY_EXCEPTION <= seen, f"not imported lazily any more: {sorted(REGISTRY_EXCEPTION - seen)}"


# ---- the checker itself ------------------------------------------------------------------------------------------
FAKE_TREE = {
    "__init__.py": "",
    "config.py": '"""Low layer."""\nimport os\nfrom plrm.methods import fit\n',             # line 3: upward
    "registry.py": ("import plrm.data\n"                                                    # line 1: not lazy
                    "def ensure_builtins():\n    import plrm.methods\n"),                  # line 3: allowed
    "data/__init__.py": "",
    "methods/__init__.py": "",
    "runner.py": ("from plrm.config import _secret, os\n"                                 # line 1: private
                  "from plrm import config\n"
                  "from plrm.eval import report as run_report\n"
                  "def fit():\n"
                  "    return config._hidden(), run_report._mean_std, run_report.__name__\n"),  # line 5: 2 private
    "eval/__init__.py": "",
    "eval/report.py": "from plrm.eval import plots\n",                                    # cycle, line 1
    "eval/plots.py": "def draw():\n    from . import report\n",                           # lazy, line 2
    "newthing.py": "",
}


def test_the_checker_reports_planted_violations_with_file_and_line(tmp_path):
    for name, text in FAKE_TREE.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    fake = scan(tmp_path)

    assert unplaced_modules(fake) == ["plrm/newthing.py: module plrm.newthing matches no row of LAYERS in "
                                      "tests/test_layers.py; add it to its layer"]
    upward = upward_imports(fake)
    assert [p.split(": ", 1)[0] for p in upward] == ["plrm/config.py:3", "plrm/registry.py:1"]
    assert "plrm.config (layer 0 base) imports plrm.methods (layer 3 methods), a higher layer" in upward[0]
    assert "the registry exception holds only inside a function" in upward[1]

    private = private_name_uses(fake)
    assert [p.split(": ", 1)[0] for p in private] == ["plrm/runner.py:1", "plrm/runner.py:5", "plrm/runner.py:5"]
    assert "uses plrm.config._secret" in private[0]
    assert {p.split(" uses ")[1].split(",")[0] for p in private[1:]} == {"plrm.config._hidden",
                                                                         "plrm.eval.report._mean_std"}

    cycles = import_cycles(fake)
    assert len(cycles) == 1, cycles
    assert cycles[0].startswith("plrm/eval/plots.py:2: import cycle plrm.eval.plots -> plrm.eval.report -> "
                            "plrm.eval.plots: plrm/eval/plots.py:2 plrm.eval.plots -> plrm.eval.report; "
                            "plrm/eval/report.py:1 plrm.eval.report -> plrm.eval.plots"), cycles


def test_method_files_have_no_plumbing():
    """A method file holds parameters, its reward, its loss and adapt: it never reaches into the data layer or the
    datamodule, and never talks to other processes itself (the episode scaffold and the base class do)."""
    forbidden = ("plrm.data", "trainer.datamodule", "all_reduce", "torch.distributed")
    scaffold = {"base.py", "episodic.py", "meta.py", "losses.py", "peruser.py", "__init__.py"}
    found = []
    for path in sorted((ROOT / "plrm" / "methods").glob("*.py")):
        if path.name in scaffold:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            found += [f"plrm/methods/{path.name}:{n}: {word}" for word in forbidden if word in code]
    assert not found, "plumbing in method files:\n  " + "\n  ".join(found)
