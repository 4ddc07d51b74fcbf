"""Installed layout: routers/, continual/, kernels/ exist only as molora subpackages."""

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
    assert not any(p and str(p).startswith(repo) for p in places), (name, places)
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
    for mod in sorted(_imported_modules("molora.demo", set()) | _imported_modules("molora.cli", set())):
        if mod in sys.stdlib_module_names or mod == "__future__":
            continue
        provided = {d.lower().replace("_", "-") for d in dists.get(mod, [])}
        # torch brings triton on Linux; transformers brings tokenizers/huggingface_hub.
        if provided and not provided & demo_reqs and mod not in ("triton", "tokenizers", "huggingface_hub", "numpy"):
            missing[mod] = sorted(provided)
    assert not missing, f"the demo imports modules the [demo] extra does not install: {missing}"
