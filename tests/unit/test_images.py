"""The split between finding images (shoal/images.py, core) and building them (shoal/ops/): the
recipe hash still covers the builder's code (tests/unit/test_layers.py keeps the core from
importing the builder). No image is built here."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from shoal import images
from shoal.ops import image_build
from shoal.settings import REPO_ROOT

SHOAL = REPO_ROOT / "shoal"


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
