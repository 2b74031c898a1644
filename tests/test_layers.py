"""The import contract of dap_ray: layers that only point down. LAYERS below is the single source of truth
(README's Development section shows it).

Read from the source with `ast`, counting every import: module level, inside functions and under
`if TYPE_CHECKING:` alike, so a function-local import cannot hide a cycle or an upward dependency.
A module may import its own layer (if that makes no cycle) or any layer below; never a layer above.

Layer 1 also holds `config` and `runtime`: every stage reads the config schema and asks the runtime
for actor counts and storage checks, and neither needs anything above `errors`, `registry` (names
the config accepts, no code) and `storage`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "dap_ray"

#: layer -> (what it is, the top-level modules / subpackages of dap_ray in it). Imports point down only.
LAYERS: dict[int, tuple[str, tuple[str, ...]]] = {
    1: ("pure math, storage, names, config, runtime",
        ("errors", "guidance", "ddim", "stats", "storage", "registry", "config", "runtime")),
    2: ("data", ("data",)),
    3: ("backbones", ("backbones",)),
    4: ("bank, sampling", ("bank", "sampling")),
    5: ("methods", ("methods",)),
    6: ("eval, metrics", ("eval", "metrics")),
    7: ("report, tracking", ("report", "tracking")),
    8: ("entry points", ("distill", "tune", "evaluate", "study", "cli", "zoo")),
}
ENTRY_POINTS = LAYERS[8][1]
#: Pure math: tensors in, tensors out. No dap_ray module but errors, no Ray, no I/O libraries.
PURE_MATH = ("guidance", "ddim", "stats")
IO_LIBRARIES = ("ray", "fsspec", "s3fs", "pyarrow", "PIL", "safetensors", "diffusers", "omegaconf")
#: Evaluation works on any image folder: it never imports the sampler.
NO_SAMPLING = ("eval", "metrics")

LAYER_OF = {part: n for n, (_, parts) in LAYERS.items() for part in parts}


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_modules(root: Path) -> dict[str, ast.Module]:
    return {module_name(p, root): ast.parse(p.read_text(), str(p)) for p in sorted(root.rglob("*.py"))}


def imports(name: str, tree: ast.Module, modules: set[str], is_package: bool) -> list[tuple[str, str | None, int]]:
    """(imported dap_ray module, imported name or None, line) for every import anywhere in `tree`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "dap_ray"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            if base.split(".")[0] != "dap_ray":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, node.lineno) if sub in modules else (base, a.name, node.lineno))
    return out


def third_party(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out - {"dap_ray"}


def graph(root: Path = PACKAGE) -> tuple[dict[str, ast.Module], dict[str, list[tuple[str, str | None, int]]]]:
    trees = read_modules(root)
    mods = set(trees)
    packages = {module_name(p, root) for p in root.rglob("__init__.py")}
    return trees, {m: imports(m, t, mods, m in packages) for m, t in trees.items()}


def component(module: str) -> str | None:
    """dap_ray.eval.run -> "eval"; the package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1 or v in edges.get(v, ()):
                out.append(sorted(scc))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def violations(root: Path = PACKAGE) -> dict[str, list[str]]:
    """Every broken rule, by rule name (empty lists when the contract holds)."""
    trees, imps = graph(root)
    out: dict[str, list[str]] = {"unplaced": [], "cycles": [], "private": [], "entry_points": [], "upward": [],
                                 "sampling": [], "pure_math": []}
    for m in trees:
        c = component(m)
        if c is not None and c not in LAYER_OF:
            out["unplaced"].append(f"{m}: add {c!r} to a layer in tests/test_layers.py")
    edges: dict[str, set[str]] = {}
    for m, found in imps.items():
        src = component(m)
        for target, name, line in found:
            where = f"{m}:{line} imports {target}{'.' + name if name else ''}"
            if target != m:
                edges.setdefault(m, set()).add(target)
            dst = component(target)
            if name is not None and name.startswith("_") and target != m:
                out["private"].append(where)
            if src is None or dst is None or src == dst:
                continue
            if dst in ENTRY_POINTS and src not in ENTRY_POINTS:
                out["entry_points"].append(where)
            if src in LAYER_OF and dst in LAYER_OF and LAYER_OF[dst] > LAYER_OF[src]:
                out["upward"].append(f"{where} (layer {LAYER_OF[src]} -> {LAYER_OF[dst]})")
            if src in NO_SAMPLING and dst == "sampling":
                out["sampling"].append(where)
            if src in PURE_MATH and dst != "errors":
                out["pure_math"].append(where)
    for m, t in trees.items():
        if component(m) in PURE_MATH:
            out["pure_math"] += [f"{m} imports {lib}" for lib in sorted(third_party(t) & set(IO_LIBRARIES))]
    out["cycles"] = [" -> ".join(c) for c in cycles(edges)]
    return out


def test_imports_point_down_only():
    bad = {rule: found for rule, found in violations().items() if found}
    assert not bad, "\n".join(f"{rule}:\n  " + "\n  ".join(found) for rule, found in bad.items())


def test_every_import_is_counted():
    """The graph sees imports inside functions and under TYPE_CHECKING, not only module-level ones."""
    _, imps = graph()
    counts = {"module": 0, "function": 0}
    for t in read_modules(PACKAGE).values():
        local = {id(n) for f in ast.walk(t) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for n in ast.walk(t):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("dap_ray"):
                counts["function" if id(n) in local else "module"] += 1
    assert counts["module"] > 50 and counts["function"] > 20, counts
    targets = {target for target, _, _ in imps["dap_ray.distill"]}
    assert "dap_ray.methods" in targets  # imported inside distill.run()


def test_checker_catches_each_kind_of_violation(tmp_path):
    """The rules can fail: a package that breaks each of them is reported, function-local imports included."""
    pkg = tmp_path / "dap_ray"
    (pkg / "eval").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "errors.py": "",
        "ddim.py": "import fsspec\nfrom dap_ray import config\n",
        "config.py": "def f():\n    from dap_ray.methods import list_methods\n",
        "methods.py": "from dap_ray import config\nfrom dap_ray.bank import _write_bytes\n",
        "bank.py": "",
        "sampling.py": "",
        "distill.py": "",
        "eval/__init__.py": "",
        "eval/run.py": "def g():\n    from dap_ray.distill import run\n    from dap_ray.sampling import schedule\n",
        "newthing.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    v = violations(pkg)
    assert v["cycles"] == ["dap_ray.config -> dap_ray.methods"]
    assert v["private"] == ["dap_ray.methods:2 imports dap_ray.bank._write_bytes"]
    assert v["entry_points"] == ["dap_ray.eval.run:2 imports dap_ray.distill.run"]
    assert v["sampling"] == ["dap_ray.eval.run:3 imports dap_ray.sampling.schedule"]
    assert "dap_ray.config:2 imports dap_ray.methods.list_methods (layer 1 -> 5)" in v["upward"]
    assert sorted(v["pure_math"]) == ["dap_ray.ddim imports fsspec", "dap_ray.ddim:2 imports dap_ray.config"]
    assert v["unplaced"] == ["dap_ray.newthing: add 'newthing' to a layer in tests/test_layers.py"]


def test_registry_names_match_the_implementations():
    """config validates against dap_ray.registry; the method and net registries must say the same."""
    from dap_ray import registry
    from dap_ray.eval.augment import OPS, PRESETS
    from dap_ray.eval.nets import list_nets
    from dap_ray.methods import list_methods

    assert list(registry.METHODS) == list_methods()
    assert list(registry.NETS) == list_nets()
    assert (PRESETS, OPS) == (registry.AUGMENT_PRESETS, registry.AUGMENT_OPS)


def test_readme_shows_the_layers():
    """README's Development section lists the same layers as LAYERS."""
    text = (PACKAGE.parent / "README.md").read_text().split("## Development", 1)[-1]
    for n, (_, parts) in LAYERS.items():
        line = next((ln for ln in text.splitlines() if ln.lstrip().startswith(f"{n}. ")), "")
        assert line and all(f"`{p}`" in line for p in parts), f"README lacks layer {n}: {parts}"
