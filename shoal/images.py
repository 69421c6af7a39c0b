"""Guest images at run time: recipes, the hash that names a build, where a built image lives.

The API and the worker processes import this module to find and describe an image; they never
build one. The builder is an operator tool (shoal/ops/image_build.py) that imports this module,
never the other way round; nothing here runs a subprocess.

An image is three files plus a manifest, in `<cache>/images/<name>-<recipe hash>/`:

    vmlinuz       Debian's cloud kernel, booted directly (no boot loader)
    initrd.img    busybox + the virtio modules; mounts /dev/vda read-only, switch_roots
    rootfs.ext4   the root file system (read-only at runtime), made without mounting anything
    manifest.json what is inside (kernel, Python and Debian package versions), sizes, timings

The recipe hash names everything an image is made from: its recipe (vm-images/NAME/),
vm-images/common, the agent, shoal/protocol.py and the code that builds it (IMAGE_CODE).
`locate` looks a build up by the current hash, so a worker only boots an image of the current
sources. The guest side of the contract (devices, command line, init) is described in
docs/guest-image.md; the constants below are the host's half of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from shoal import protocol
from shoal.settings import REPO_ROOT, Settings

IMAGES_SRC = REPO_ROOT / "vm-images"
COMMON_SRC = IMAGES_SRC / "common"
AGENT_SRC = IMAGES_SRC / "agent"

# --- the device contract (the VM driver builds its libvirt XML to match) ----------------------
ROOT_DEVICE = "/dev/vda"  # rootfs.ext4, virtio-blk, read-only
DATA_DEVICE = "/dev/vdb"  # the session's ext4 data disk, virtio-blk, read-write
DATA_MOUNT = "/mnt/data"
DATA_UID = 1000  # user `sandbox` in the guest; owns the data disk's root directory
SANDBOX_USER = "sandbox"
CHANNEL_NAME = protocol.CHANNEL_NAME  # the one virtio-serial port
# Constant part of the guest kernel command line; `kernel_cmdline()` appends per-VM settings.
# panic=-1: reboot at once on a panic (the domain should say on_reboot=destroy); 8250.nr_uarts=1
# and the i8042 flags skip probing hardware the guest does not have, which is slow under TCG.
KERNEL_CMDLINE = (
    "console=ttyS0 root=/dev/vda ro rootfstype=ext4 quiet panic=-1 "
    "8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.nopnp"
)

# Bump when the build changes what it produces (BASE_FORMAT, the base layer's, is in
# shoal/ops/image_base.py). FINAL_FORMAT is also covered by hashing IMAGE_CODE.
FINAL_FORMAT = 1
# Guest paths.
GUEST_INIT = "/opt/shoal/init"
GUEST_AGENT_DIR = "/opt/shoal/agent"
GUEST_MPL_CACHE = "/opt/shoal/mpl-cache"

KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
ROOTFS_FILE = "rootfs.ext4"
MANIFEST_FILE = "manifest.json"

# The code that decides what an image holds: its source is part of the recipe hash, so a change
# to the builder is a new image. The builder is in shoal/ops/, which this module must not import,
# so its files are named here (tests/unit/test_images.py checks every shoal/ops/image_*.py is).
# data_disk.py is here too: a snapshot template holds a data disk it made, and templates are keyed
# by the recipe hash, so a new data disk format must be a new hash.
_SHOAL_DIR = Path(__file__).resolve().parent
IMAGE_CODE = (
    _SHOAL_DIR / "images.py",
    _SHOAL_DIR / "cache_dirs.py",
    _SHOAL_DIR / "data_disk.py",
    _SHOAL_DIR / "ops" / "image_base.py",
    _SHOAL_DIR / "ops" / "image_build.py",
    _SHOAL_DIR / "ops" / "image_final.py",
    _SHOAL_DIR / "ops" / "image_fs.py",
    _SHOAL_DIR / "ops" / "image_harden.py",
    _SHOAL_DIR / "ops" / "image_steps.py",
)


class ImageBuildError(Exception):
    """A build step failed. `step` names it; the message carries the tail of its output.

    Defined in the core, not next to the builder (shoal/ops/image_build.py re-exports it),
    because loading a recipe (step 'recipe') and making a data disk raise it too.
    """

    def __init__(
        self, step: str, message: str, output_tail: str = "", log_path: Path | None = None
    ) -> None:
        super().__init__(step, message)
        self.step = step
        self.message = message
        self.output_tail = output_tail
        self.log_path = log_path

    def __str__(self) -> str:
        text = f"image build failed at step '{self.step}': {self.message}"
        if self.log_path:
            text += f" (full log: {self.log_path})"
        if self.output_tail:
            text += "\n--- last lines of output ---\n" + self.output_tail
        return text


@dataclass(frozen=True)
class Recipe:
    name: str
    dir: Path
    suite: str
    variant: str
    include: tuple[str, ...]
    prune: tuple[str, ...]
    kernel_package: str
    modules: tuple[str, ...]
    headroom_mib: int
    matplotlib_font_cache: bool


@dataclass(frozen=True)
class ImageArtifacts:
    name: str
    dir: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    manifest: Path
    recipe_hash: str

    def read_manifest(self) -> dict:
        return json.loads(self.manifest.read_text())


# --- recipes and hashes ----------------------------------------------------------------------


def recipe_names() -> list[str]:
    return sorted(p.parent.name for p in IMAGES_SRC.glob("*/recipe.toml"))


def load_recipe(name: str = "python") -> Recipe:
    path = IMAGES_SRC / name / "recipe.toml"
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) or not path.is_file():
        known = ", ".join(recipe_names()) or "none"
        raise ImageBuildError("recipe", f"no recipe {name!r} ({path}); known: {known}")
    data = tomllib.loads(path.read_text())
    base, kernel, image = data.get("base", {}), data.get("kernel", {}), data.get("image", {})
    try:
        return Recipe(
            name=name,
            dir=path.parent,
            suite=base["suite"],
            variant=base.get("variant", "minbase"),
            include=tuple(base["include"]),
            prune=tuple(base.get("prune", ())),
            kernel_package=kernel["package"],
            modules=tuple(kernel.get("modules", ())),
            headroom_mib=int(image.get("headroom_mib", 64)),
            matplotlib_font_cache=bool(image.get("matplotlib_font_cache", False)),
        )
    except KeyError as exc:
        raise ImageBuildError("recipe", f"{path}: missing field {exc}") from None


def tree_files(root: Path) -> list[Path]:
    """Files under root that go into an image, sorted; caches and dotfiles are not part of it."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") or part == "__pycache__" for part in rel):
            continue
        if p.is_file() or p.is_symlink():
            out.append(p)
    return sorted(out)


def agent_files(agent_src: Path) -> list[Path]:
    return sorted(p for p in agent_src.glob("*.py") if p.is_file())


def _hash_inputs(recipe: Recipe, agent_src: Path) -> list[Path]:
    files = tree_files(recipe.dir) + tree_files(COMMON_SRC) + agent_files(agent_src)
    return files + [Path(protocol.__file__).resolve(), *IMAGE_CODE]


def recipe_hash(name: str = "python", *, _agent_src: Path = AGENT_SRC) -> str:
    """16 hex digits naming everything the final image is made from (not the mirror)."""
    recipe = load_recipe(name)
    h = hashlib.sha256(f"shoal-image:{FINAL_FORMAT}:{name}\n".encode())
    for path in _hash_inputs(recipe, _agent_src):
        try:
            rel = path.relative_to(REPO_ROOT)
        except ValueError:
            rel = Path("agent") / path.name  # an agent from outside the tree (tests)
        data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        mode = "x" if os.access(path, os.X_OK) else "-"
        h.update(f"{rel}\0{mode}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


# --- lookup ----------------------------------------------------------------------------------


def images_dir(settings: Settings) -> Path:
    return Path(settings.cache) / "images"


def artifacts_at(name: str, directory: Path, rhash: str) -> ImageArtifacts:
    return ImageArtifacts(
        name=name,
        dir=directory,
        kernel=directory / KERNEL_FILE,
        initrd=directory / INITRD_FILE,
        rootfs=directory / ROOTFS_FILE,
        manifest=directory / MANIFEST_FILE,
        recipe_hash=rhash,
    )


def locate(settings: Settings, name: str = "python") -> ImageArtifacts | None:
    """The built image for the current recipe, or None if it has not been built yet."""
    rhash = recipe_hash(name)
    art = artifacts_at(name, images_dir(settings) / f"{name}-{rhash}", rhash)
    if all(p.is_file() for p in (art.kernel, art.initrd, art.rootfs, art.manifest)):
        return art
    return None


def kernel_cmdline(settings: Settings) -> str:
    """The full command line for a guest: the constant part plus per-VM settings."""
    return f"{KERNEL_CMDLINE} shoal.tmp_mib={int(settings.tmp_mib)}"
