"""The package's shape: stages in one direction, no import cycle, imports at the top of
modules, modules of a size a reader can hold, a short top level.

Static (ast) checks over m2det_jax/**/*.py, so a cycle or a layer break fails here before
it fails at import.
"""

import ast
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "m2det_jax")
MAX_LINES = 400
# Imports allowed inside functions: optional heavy dependencies, imported only where used.
LAZY_OK = ("torch", "tensorflow", "orbax.export", "onnx")
# The stages, upstream first: a module imports only from its own stage or one above it.
LAYERS = (
    ("errors", "paths", "_compat", "reference"),  # no project imports
    ("distributed",),  # processes, mesh, shardings
    ("core",),  # boxes, priors, preprocessing
    ("config",),
    ("data",),
    ("models",),
    ("checkpoints",),
    ("inference",),
    ("evaluation",),
    ("train",),
    ("perf",),
    ("cli",),
)
STAGE_PACKAGES = {"config", "core", "data", "models", "checkpoints", "inference", "evaluation",
                  "train", "perf", "reference"}
TOP_MODULES = {"__init__", "_compat", "cli", "distributed", "errors", "paths"}


def _modules() -> dict[str, str]:
    """module name -> path for every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path: str):
    """(imported project module, lineno, inside a function) for every import of `path`."""
    tree = ast.parse(open(path).read(), path)
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from m2det_jax import data` imports the module m2det_jax.data.
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in inner


def _graph() -> dict[str, set[str]]:
    """module -> project modules it imports. Importing a subpackage (e.g. `from m2det_jax
    import data`) counts as importing every module of it, whether its __init__ loads them
    eagerly or on first use; the root package (the public API facade) does not."""
    graph = {}
    for mod, path in MODULES.items():
        deps = set()
        for name, _, _ in _imports(path):
            if name not in MODULES or name == mod:
                continue
            deps.add(name)
            if name != "m2det_jax" and not mod.startswith(name + "."):
                deps |= {m for m in MODULES if m.startswith(name + ".")}
        graph[mod] = deps
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            # A package's own submodules are loaded by it: importing the package from a
            # submodule is no cycle of meaning; but a submodule importing a sibling that
            # imports it back is.
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def _without_package_edges(graph):
    """Drops `pkg -> pkg.sub` edges (an __init__ re-exporting its own submodules) so that
    `pkg.sub -> pkg.other` through the package is not counted twice."""
    return {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}


def test_no_import_cycle():
    cycle = _find_cycle(_without_package_edges(_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_at_the_top(mod):
    lazy = [(n, line) for n, line, inner in _imports(MODULES[mod]) if inner
            and not n.startswith(LAZY_OK)]  # fmt: skip
    assert not lazy, f"{mod}: imports inside functions: {lazy}"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_module_size(mod):
    n = sum(1 for _ in open(MODULES[mod]))
    assert n <= MAX_LINES, f"{mod}: {n} lines (> {MAX_LINES}): split it by stage"


def _layer(module: str) -> int:
    stage = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if stage in names)


def _layer_breaks(graph) -> list[str]:
    return [f"{m} imports {d}" for m, deps in sorted(graph.items()) if m != "m2det_jax"
            for d in sorted(deps) if d != "m2det_jax" and _layer(d) > _layer(m)]


def test_stages_import_only_upstream():
    assert not _layer_breaks(_graph()), "\n".join(_layer_breaks(_graph()))


def test_the_layer_check_finds_a_break():
    assert _layer_breaks({"m2det_jax.core.priors": {"m2det_jax.train.loop"}}) == [
        "m2det_jax.core.priors imports m2det_jax.train.loop"]
    assert _layer_breaks({"m2det_jax.train.loop": {"m2det_jax.core.priors"}}) == []


def test_every_module_has_a_stage():
    for mod in MODULES:
        if mod != "m2det_jax":
            _layer(mod)  # StopIteration: a module outside every stage


def test_top_level_is_the_stages_and_a_few_modules():
    entries = os.listdir(PACKAGE)
    packages = {e for e in entries if os.path.isfile(os.path.join(PACKAGE, e, "__init__.py"))}
    modules = {e[:-3] for e in entries if e.endswith(".py")}
    assert packages == STAGE_PACKAGES, packages
    assert modules == TOP_MODULES, modules


def test_the_package_uses_no_compatibility_path():
    """Old module paths (`m2det_jax.predict`, ...) are for users; the package imports the
    modules where they live."""
    from m2det_jax._compat import MOVED

    old = tuple(f"m2det_jax.{m}" for m in MOVED)
    for mod, path in MODULES.items():
        for name, line, _ in _imports(path):
            hit = name in old or name.startswith(tuple(o + "." for o in old))
            assert not hit, f"{mod}:{line} imports {name}, an earlier path"


def test_nothing_imports_the_entry_points():
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if "m2det_jax.cli" in deps)
    assert users == [], f"m2det_jax.cli imported by {users}"
    users = sorted(m for m, deps in graph.items() if "m2det_jax.train.loop" in deps)
    allowed = {"m2det_jax.cli", "m2det_jax.train"}  # the CLI calls train_and_evaluate
    assert set(users) <= allowed, f"m2det_jax.train.loop imported by {users}"


def test_test_modules_are_named_after_what_they_test():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    known = STAGE_PACKAGES | TOP_MODULES | {"layout"}
    for f in sorted(os.listdir(tests_dir)):
        if f.startswith("test_") and f.endswith(".py"):
            assert f[5:-3].split("_")[0] in known, f


def test_docstrings_do_not_point_outside_the_repository():
    for mod, path in MODULES.items():
        assert "ORIGINAL.md" not in open(path).read(), mod


def test_tests_import_helpers_not_other_test_modules():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    for f in sorted(os.listdir(tests_dir)):
        if f.endswith(".py"):
            for name, line, _ in _imports(os.path.join(tests_dir, f)):
                assert not name.startswith("tests.test_"), f"{f}:{line} imports {name}"
                assert name != "conftest", f"{f}:{line} imports conftest"


def test_earlier_module_paths_still_import():
    """The public paths of earlier releases (SPEC: `predict.prepare_variables`,
    `postprocess.nms`, `voc_eval.voc_evaluate`, ...) resolve to the module that holds their
    names now: the same module object, submodules included."""
    import importlib

    from m2det_jax._compat import MOVED

    for old, new in MOVED.items():
        got = importlib.import_module(f"m2det_jax.{old}")
        assert got is importlib.import_module(f"m2det_jax.{new}"), old
    import m2det_jax.postprocess.plain as old_plain
    from m2det_jax.predict import make_detector, prepare_variables  # noqa: F401
    from m2det_jax.voc_eval import voc_evaluate  # noqa: F401

    import m2det_jax
    import m2det_jax.inference.postprocess.plain as plain
    from m2det_jax import postprocess

    assert old_plain is plain and postprocess.nms is m2det_jax.inference.postprocess.nms
    assert m2det_jax.predict.prepare_variables is m2det_jax.inference.prepare_variables
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("m2det_jax.predictt")


def _requirement_names(dist: str) -> list[str]:
    """Names of what `dist` requires on this Python (no extras)."""
    out = []
    for r in importlib.metadata.requires(dist) or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req.name)
    return out


def test_the_device_kit_carries_what_an_accelerator_image_lacks():
    """Every distribution the installed package needs (its requirements and theirs) is on
    the image (launch/device_kit.py IMAGE_PACKAGES) or in the kit, and the kit's versions
    are pinned in constraints/newest.txt."""
    spec = importlib.util.spec_from_file_location(
        "device_kit", Path(PACKAGE).parent / "launch" / "device_kit.py")
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    known = {kit.normalise(n) for n in kit.IMAGE_PACKAGES + kit.KIT_PACKAGES}
    seen, todo = set(), _requirement_names("m2det-jax")
    while todo:
        name = kit.normalise(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += _requirement_names(name)
        except importlib.metadata.PackageNotFoundError:
            pass  # an optional one that this Python does not install
    assert sorted(seen - known) == []
    pins = kit.pinned_versions()
    assert [n for n in kit.KIT_PACKAGES if n not in pins] == []
    assert not set(kit.IMAGE_PACKAGES) & set(kit.KIT_PACKAGES)
