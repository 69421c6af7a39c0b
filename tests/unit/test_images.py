"""The split between finding images (shoal/images.py, core) and building them (shoal/ops/): the
recipe hash still covers the builder's code, and run-time code never imports the operator tools.
No image is built here."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

from shoal import images
from shoal.ops import image_build
from shoal.settings import REPO_ROOT

SHOAL = REPO_ROOT / "shoal"
# Operator tools that are still directly in shoal/ (they are moving into shoal/ops/).
NOT_CORE = {"cli.py", "stack.py"}


def test_image_code_lists_every_builder_module():
    assert all(path.is_file() for path in images.IMAGE_CODE), images.IMAGE_CODE
    assert set((SHOAL / "ops").glob("image_*.py")) <= set(images.IMAGE_CODE)
    loaded = {
        Path(module.__file__).resolve()
        for name, module in sys.modules.items()
        if name.startswith("shoal.ops.image") and getattr(module, "__file__", None)
    }
    assert Path(image_build.__file__).resolve() in loaded
    assert loaded <= set(images.IMAGE_CODE)


def test_a_change_to_the_builder_changes_the_recipe_hash(tmp_path, monkeypatch):
    copies = []
    for path in images.IMAGE_CODE:
        copy = tmp_path / path.relative_to(SHOAL)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, copy)
        copies.append(copy)
    monkeypatch.setattr(images, "IMAGE_CODE", tuple(copies))
    before = images.recipe_hash("python")
    builder = tmp_path / "ops" / "image_build.py"
    builder.write_text(builder.read_text() + "\n# changed\n")
    assert images.recipe_hash("python") != before


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_runtime_code_never_imports_the_operator_tools():
    files = [p for p in SHOAL.glob("*.py") if p.name not in NOT_CORE]
    for top in ("api", "workers", "pool"):
        files += (REPO_ROOT / top).rglob("*.py")
    assert SHOAL / "images.py" in files and REPO_ROOT / "workers" / "vm.py" in files
    for path in files:
        bad = {m for m in _imported_modules(path) if m == "shoal.ops" or m.startswith("shoal.ops.")}
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports {sorted(bad)}"
