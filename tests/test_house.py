"""House rules checked on the source: no import circle in the engine, and no method
name tested as a string outside engine/methods/ (ask the method's spec instead)."""

from __future__ import annotations

import ast
from pathlib import Path

from engine.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


# ---- import circles in engine/ ---------------------------------------------------------------------

def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def load_time_imports(body: list) -> list:
    """Import statements run when the module loads: top level, in if/try/with blocks and
    class bodies; not in functions, not under `if TYPE_CHECKING:`."""
    out = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                out += load_time_imports(node.body)
            out += load_time_imports(node.orelse)
        elif isinstance(node, ast.Try):
            out += load_time_imports(node.body)
            for h in node.handlers:
                out += load_time_imports(h.body)
            out += load_time_imports(node.orelse) + load_time_imports(node.finalbody)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            out += load_time_imports(node.body)
    return out


def all_imports(body: list) -> list:
    """Every import statement, deferred ones inside functions included (an import moved
    into a function to dodge a circle still closes it); not under `if TYPE_CHECKING:`."""
    out = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            out += all_imports(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                out += all_imports(getattr(node, field, None) or [])
    return out


HOUSE = ("engine", "studio", "workers")


def import_graph(packages: str | tuple[str, ...] = "engine", deferred: bool = False) -> dict[str, set[str]]:
    """{module: modules of `packages` it imports} (at load time, or anywhere with
    `deferred`). Importing a.b.c also runs the __init__ of a.b (unless the importer is
    inside a.b, which is then already loading)."""
    find = all_imports if deferred else load_time_imports
    packages = (packages,) if isinstance(packages, str) else packages
    files = {module_name(p): p for package in packages for p in (ROOT / package).rglob("*.py")}
    is_pkg = {m: p.name == "__init__.py" for m, p in files.items()}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        own_pkg = mod if is_pkg[mod] else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in find(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
                continue
            if node.level:
                base = own_pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else own_pkg
                src = f"{base}.{node.module}" if node.module else base
            else:
                src = node.module or ""
            targets.add(src)
            targets |= {f"{src}.{a.name}" for a in node.names if f"{src}.{a.name}" in files}
        edges: set[str] = set()
        for t in targets:
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                anc = ".".join(parts[:i])
                if anc in files and anc != mod and not (is_pkg[anc] and (mod + ".").startswith(anc + ".")):
                    edges.add(anc)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_circle_and_the_package_init_edge():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    g = import_graph()
    # engine.prepare imports engine.methods, so loading it runs engine/methods/__init__.py
    assert "engine.methods" in g["engine.prepare"]
    # a package's own modules do not depend on its __init__ through the package
    assert "engine.methods" not in g["engine.methods.base"]


def test_deferred_imports_are_followed():
    src = "import os\nif TYPE_CHECKING:\n    import a\ndef f():\n    try:\n        import b\n    except E:\n        import c\n"
    tree = ast.parse(src)
    assert [n.names[0].name for n in load_time_imports(tree.body)] == ["os"]
    assert [n.names[0].name for n in all_imports(tree.body)] == ["os", "b", "c"]


def test_no_import_circle_in_the_engine():
    found = cycles(import_graph())
    assert not found, "import circles in engine/ at load time: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_circle_in_the_engine_counting_deferred_imports():
    found = cycles(import_graph(deferred=True))
    assert not found, ("import circles in engine/ (imports inside functions included): "
                       + "; ".join(" <-> ".join(c) for c in found))


def test_no_import_circle_in_the_house_counting_deferred_imports():
    """engine, studio and workers together: an import moved into a function to dodge a
    circle (studio.service <-> studio.gguf, workers.tasks <-> workers.packing were two)
    still closes it."""
    found = cycles(import_graph(HOUSE, deferred=True))
    assert not found, ("import circles in the house (imports inside functions included): "
                       + "; ".join(" <-> ".join(c) for c in found))


def test_the_house_graph_sees_imports_across_packages_and_inside_functions():
    g = import_graph(HOUSE, deferred=True)
    assert "workers.settings" in g["studio.api"]          # across packages, at load time
    assert "engine.estimator" in g["studio.routes.estimate"]   # inside a function


# ---- method names tested as strings ------------------------------------------------------------------

SCANNED = ("engine", "studio", "workers")
UI_DEFAULT_DIR = "studio"


def names_in(node, names: set[str]) -> list[str]:
    """The constants of `names` a node is (a string) or holds (a literal tuple, list or set)."""
    if isinstance(node, ast.Constant) and node.value in names:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names]
    return []


def method_name_uses(tree: ast.AST, names: set[str]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(name tests, UI-style defaults) in one module. A name test is a method-name constant
    compared with something (other than a `.family`, whose values share two spellings
    with method names), a literal collection of two or more method names, or a method
    name passed to a call. A default is `NAME = "lora"` or `value="lora"`."""
    tests: list[tuple[int, str]] = []
    defaults: list[tuple[int, str]] = []

    def named(node) -> list[str]:
        return names_in(node, names)

    def is_family(node) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "family"

    seen_in_compare: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            seen_in_compare.update(id(o) for o in operands)
            if any(is_family(o) for o in operands):
                continue
            for o in operands:
                hit = named(o)
                if hit:
                    tests.append((node.lineno, f"compared with {hit}"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and id(node) not in seen_in_compare:
            hit = named(node)
            if len(hit) >= 2:
                tests.append((node.lineno, f"a list of method names {hit}"))
        elif isinstance(node, ast.Dict):
            hit = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
            if len(hit) >= 2:
                tests.append((node.lineno, f"a mapping keyed by method names {hit}"))
        elif isinstance(node, ast.Call):
            for a in node.args:
                if isinstance(a, ast.Constant) and a.value in names:
                    tests.append((a.lineno, f"{a.value!r} passed to a call"))
            for k in node.keywords:
                if isinstance(k.value, ast.Constant) and k.value.value in names:
                    if k.arg == "value":
                        defaults.append((k.value.lineno, f"value={k.value.value!r}"))
                    else:
                        tests.append((k.value.lineno, f"{k.arg}={k.value.value!r} passed to a call"))
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value in names:
            defaults.append((node.lineno, f"{node.value.value!r} assigned"))
    return sorted(tests), sorted(defaults)


def test_name_scan_catches_the_old_shapes():
    names = set(METHODS)
    old = ('def is_lora_run(run):\n    return run.get("method") in ("lora", "dora", "qlora")\n'
           'TRAINS_EXISTING = ("full", "top_k", "bitfit", "ln_tuning")\n'
           'if getattr(cfg, "name", "") == "qlora": pass\n'
           'help = method_help("lora")\n')
    tests, _ = method_name_uses(ast.parse(old), names)
    assert [line for line, _ in tests] == [2, 3, 4, 5]
    ok = 'x = spec.family in ("lora", "ia3")\nd = {"full": "empty"}\nm = gr.Dropdown(value="lora")\n'
    tests, defaults = method_name_uses(ast.parse(ok), names)
    assert tests == [] and defaults == [(3, "value='lora'")]


def test_no_method_name_is_tested_outside_engine_methods():
    names = set(METHODS)
    problems, defaults = [], []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("engine/methods/"):
                continue
            tests, defs = method_name_uses(ast.parse(path.read_text(), rel), names)
            problems += [f"{rel}:{line}: {what}" for line, what in tests]
            defaults += [(rel, f"{rel}:{line}: {what}") for line, what in defs]
    problems += [where for rel, where in defaults if not rel.startswith(UI_DEFAULT_DIR + "/")]
    ui_defaults = [where for rel, where in defaults if rel.startswith(UI_DEFAULT_DIR + "/")]
    if len(ui_defaults) > 1:
        problems += [f"more than one UI default method: {w}" for w in ui_defaults]
    assert not problems, ("method names tested outside engine/methods/ (ask get_method(name).family, "
                          ".adds_params, .quantizes_base, .plan, ... instead):\n" + "\n".join(problems))


# ---- routes: one way in ---------------------------------------------------------------------------

ROUTE_DECORATORS = {"get", "post", "put", "delete", "patch", "api_route", "websocket", "route"}


def route_decorators_outside_routes(tree: ast.AST) -> list[int]:
    """Lines of `@x.get(...)`-style route decorators that are not inside a function named
    `routes` (the one way in: studio.routes' modules define `routes(ctx) -> APIRouter`)."""
    bad: list[int] = []

    def visit(node, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            now = inside or (isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and child.name == "routes")
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not inside:
                for d in child.decorator_list:
                    if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in ROUTE_DECORATORS:
                        bad.append(d.lineno)
            visit(child, now)

    visit(tree, False)
    return bad


def test_routes_are_registered_one_way():
    import studio.routes as routes_pkg

    offenders = []
    for package in HOUSE:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line in route_decorators_outside_routes(ast.parse(path.read_text(), str(path))):
                offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, "a route registered outside a `routes(ctx)` function: " + ", ".join(offenders)
    listed = {m.__name__ for m in routes_pkg.ROUTE_MODULES}
    for path in (ROOT / "studio" / "routes").glob("*.py"):
        if path.name != "__init__.py":
            assert f"studio.routes.{path.stem}" in listed, f"{path.name} is not in studio.routes.ROUTE_MODULES"
    assert all(callable(getattr(m, "routes", None)) for m in routes_pkg.ROUTE_MODULES)


def test_the_route_check_sees_a_stray_route():
    src = ("def build(api):\n    @api.get('/x')\n    def x():\n        pass\n"
           "def routes(ctx):\n    @api.post('/y')\n    def y():\n        pass\n")
    assert route_decorators_outside_routes(ast.parse(src)) == [2]


# ---- model families compared as strings --------------------------------------------------------------

FAMILY_HOME = "engine/arch.py"


def family_names() -> set[str]:
    """Every family name and config model_type engine.arch describes."""
    from engine.arch import ARCHS, supported_model_types

    return {a.family for a in ARCHS} | set(supported_model_types())


def family_name_uses(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """Family-name tests in one module: a family constant (or a literal collection holding
    one) compared with something (==, !=, in, not in), or a mapping keyed by two or more
    family names (a per-family table that belongs in the Arch description)."""
    found: list[tuple[int, str]] = []

    def named(node) -> list[str]:
        return names_in(node, names)

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for o in [node.left, *node.comparators]:
                hit = named(o)
                if hit:
                    found.append((node.lineno, f"compared with {hit}"))
        elif isinstance(node, ast.Dict):
            hit = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
            if len(hit) >= 2:
                found.append((node.lineno, f"a mapping keyed by family names {hit}"))
    return sorted(found)


def test_family_scan_catches_the_old_shapes():
    names = family_names()
    old = ('if dims.family == "llama": pass\n'
           'ok = getattr(cfg, "model_type", "") not in ("bert", "roberta", "deberta-v2")\n'
           'DEFAULTS = {"llama": 1, "bert": 2}\n'
           'if "gpt2" != kind: pass\n')
    assert [line for line, _ in family_name_uses(ast.parse(old), names)] == [1, 2, 3, 4]
    ok = ('TINY = {"tiny-llama": "llama"}\nw = Writer(tmp, "llama")\nif arch.is_decoder: pass\n'
          'return "gpt2"\n')
    assert family_name_uses(ast.parse(ok), names) == []


def test_no_family_name_is_compared_outside_engine_arch():
    names = family_names()
    problems = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == FAMILY_HOME:
                continue
            problems += [f"{rel}:{line}: {what}"
                         for line, what in family_name_uses(ast.parse(path.read_text(), rel), names)]
    assert not problems, ("model-family names compared outside engine/arch.py (ask the Arch description: "
                          "arch_of(model).is_encoder, .final_norm, .kv_prefix, ... instead):\n"
                          + "\n".join(problems))
