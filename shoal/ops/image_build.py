"""Build a guest image from its recipe (vm-images/NAME/) into the cache: `build`.

An operator tool (`shoal image build`; the stack builds the default image on first start); a
running Shoal only finds built images (shoal/images.py). An image is built in two layers, so that
changing the agent does not re-run debootstrap:

    base   `<cache>/base/<name>-<base key>/`: debootstrap'd root + kernel + busybox, keyed by the
           package list, the mirror and the kernel package. Minutes to make; made rarely.
           shoal/ops/image_base.py
    final  the image itself, keyed by the recipe hash (recipe, vm-images/common, the agent,
           shoal/protocol.py, the builder's code). A hard-linked copy of the base root, plus the
           agent and init scripts, packed with `mkfs.ext4 -d`. About a minute.
           shoal/ops/image_final.py

Every step runs in a scratch directory next to its destination, renamed into place only when
complete, so a failed or interrupted build never leaves a half-written image in the cache.
The builder's modules are shoal/ops/image_*.py; the recipe hash covers the source of each
(shoal.images.IMAGE_CODE), so a change to the builder is a new image.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from shoal.cache_dirs import exclusive_lock, mkdir_public
from shoal.images import (
    AGENT_SRC,
    CHANNEL_NAME,
    DATA_DEVICE,
    DATA_MOUNT,
    DATA_UID,
    INITRD_FILE,
    KERNEL_CMDLINE,
    KERNEL_FILE,
    MANIFEST_FILE,
    ROOT_DEVICE,
    ROOTFS_FILE,
    ImageBuildError,
    artifacts_at,
    images_dir,
    load_recipe,
    recipe_hash,
)
from shoal.ops.image_base import base_key, build_base, debian_mirror
from shoal.ops.image_final import build_final
from shoal.ops.image_fs import clean_partials, safe_rmtree
from shoal.ops.image_steps import Build, Progress
from shoal.settings import Settings

# The public API; ImageBuildError (defined in shoal/images.py) and debian_mirror are re-exported.
__all__ = ["KEEP_IMAGES", "ImageBuildError", "build", "debian_mirror"]

KEEP_IMAGES = 3  # built images kept per recipe, the newest included (older ones are deleted)


def build(
    settings: Settings,
    name: str = "python",
    progress: Progress = print,
    force: bool = False,
    *,
    _agent_src: Path = AGENT_SRC,
    _dest: Path | None = None,
) -> Path:
    """Build image `name` unless the current recipe is built already; return its directory.

    force=True rebuilds both layers (fresh packages from the mirror). Raises ImageBuildError.
    """
    recipe = load_recipe(name)
    rhash = recipe_hash(name, _agent_src=_agent_src)
    parent = _dest or images_dir(settings)
    final = parent / f"{name}-{rhash}"
    art = artifacts_at(name, final, rhash)
    if not force and art.manifest.is_file():
        progress(f"[image {name}] {final} is up to date")
        return final
    mkdir_public(parent, _dest or Path(settings.cache))
    with exclusive_lock(parent / f".lock-{name}"):
        if not force and art.manifest.is_file():  # someone else built it while we waited
            progress(f"[image {name}] {final} is up to date")
            return final
        clean_partials(parent)
        work = parent / f".{final.name}.partial-{os.getpid()}"
        safe_rmtree(work)
        work.mkdir()
        b = Build(name, progress, work / "build.log")
        b.say(f"building {final.name} in {parent}")
        t0 = time.monotonic()
        try:
            if force:
                mirror = debian_mirror(settings, recipe.suite)
                safe_rmtree(Path(settings.cache) / "base" / f"{name}-{base_key(recipe, mirror)}")
            base, base_info = build_base(settings, recipe, b)
            out = build_final(recipe, rhash, b, work, base, _agent_src)
            seconds = round(time.monotonic() - t0, 1)
            manifest = {
                "name": name,
                "recipe_hash": rhash,
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "build_seconds": seconds,
                "step_seconds": b.timings,
                "base": {
                    "key": base_info["key"],
                    "reused": base_info["reused"],
                    "built_at": base_info["built_at"],
                    "seconds": base_info["seconds"],
                    "debootstrap_seconds": base_info["debootstrap_seconds"],
                    "mirror": base_info["mirror"],
                    "suite": base_info["suite"],
                },
                "kernel": base_info["kernel"] | {"cmdline": KERNEL_CMDLINE},
                "busybox_version": base_info["busybox_version"],
                "devices": {
                    "root": ROOT_DEVICE,
                    "data": DATA_DEVICE,
                    "data_mount": DATA_MOUNT,
                    "data_uid": DATA_UID,
                    "console": "ttyS0",
                    "channel": CHANNEL_NAME,
                },
                "files": {"kernel": KERNEL_FILE, "initrd": INITRD_FILE, "rootfs": ROOTFS_FILE},
                "sizes": out["sizes"],
                "agent_files": out["agent_files"],
                "privileges_stripped": out["privileges_stripped"],
                "python": out["python"],
                "debian_packages": out["debs"],
            }
            (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            for p in work.iterdir():
                p.chmod(0o644)
            work.chmod(0o755)
            if final.exists():
                old = parent / f".{final.name}.old-{os.getpid()}"
                final.rename(old)
                work.rename(final)
                safe_rmtree(old)
            else:
                work.rename(final)
        except BaseException as exc:
            failed_log = parent / f"{final.name}.failed.log"
            with contextlib.suppress(OSError):
                shutil.copy2(work / "build.log", failed_log)
            safe_rmtree(work)
            if isinstance(exc, ImageBuildError) and failed_log.exists():
                exc.log_path = failed_log
            raise
        with contextlib.suppress(OSError):
            (parent / f"{final.name}.failed.log").unlink()
        _prune_old_images(parent, name, final, b)
        b.say(f"built {final} in {seconds:.0f}s (rootfs {out['sizes']['rootfs_bytes'] >> 20} MiB)")
    return final


def _prune_old_images(parent: Path, name: str, keep_dir: Path, b: Build) -> None:
    """Keep the KEEP_IMAGES newest images of this recipe (each is ~1.5 GB; every agent change
    makes one). A running VM keeps its open files; templates are keyed by recipe hash anyway."""
    built = sorted(
        (p for p in parent.glob(f"{name}-*") if (p / MANIFEST_FILE).is_file()),
        key=lambda p: (p / MANIFEST_FILE).stat().st_mtime,
        reverse=True,
    )
    for old in [p for p in built if p != keep_dir][KEEP_IMAGES - 1 :]:
        b.say(f"removing old image {old.name}")
        safe_rmtree(old)
