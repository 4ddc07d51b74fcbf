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
