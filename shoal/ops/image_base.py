"""The base layer of a guest image: a debootstrap'd root, the kernel and busybox.

`<cache>/base/<name>-<base key>/`, keyed by the package list, the mirror and the kernel package
(`base_key`), so that changing the agent or the init scripts does not re-run debootstrap. Minutes
to make; made rarely. The final layer (shoal/ops/image_final.py) is a hard-linked copy of it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from shoal.cache_dirs import mkdir_public
from shoal.images import GUEST_MPL_CACHE, KERNEL_FILE, ImageBuildError, Recipe
from shoal.ops.image_fs import clean_partials, mounts_under, safe_rmtree
from shoal.ops.image_steps import Build
from shoal.settings import Settings

# Bump when a change to the build must also redo the base layer (it is part of the base key).
BASE_FORMAT = 1


def base_key(recipe: Recipe, mirror: str) -> str:
    """16 hex digits naming the base layer: what debootstrap and apt-get download fetch."""
    spec = {
        "format": BASE_FORMAT,
        "suite": recipe.suite,
        "variant": recipe.variant,
        "include": sorted(recipe.include),
        "prune": list(recipe.prune),
        "kernel": recipe.kernel_package,
        "modules": list(recipe.modules),
        "mpl": recipe.matplotlib_font_cache,
        "mirror": mirror.rstrip("/"),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# --- the mirror ------------------------------------------------------------------------------


def _apt_sources() -> Iterator[tuple[list[str], list[str], list[str]]]:
    """(types, uris, suites) of every enabled entry in the host's apt sources."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", Path(path).read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                yield (
                    fields.get("types", "").split(),
                    fields.get("uris", "").split(),
                    fields.get("suites", "").split(),
                )
    lists = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    for path in lists:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3:
                    yield [words[0]], [words[1]], [words[2]]


def debian_mirror(settings: Settings, suite: str = "bookworm") -> str:
    """SHOAL_DEBIAN_MIRROR, else the host's apt source that serves `suite` itself."""
    if settings.debian_mirror:
        return settings.debian_mirror.rstrip("/")
    for types, uris, suites in _apt_sources():
        if "deb" in types and suite in suites:
            for uri in uris:
                if uri.startswith(("http://", "https://", "file:/")):
                    return uri.rstrip("/")
    raise ImageBuildError(
        "mirror",
        f"no apt source for Debian {suite!r} in /etc/apt/sources.list(.d); "
        "set SHOAL_DEBIAN_MIRROR (e.g. to a Debian mirror's /debian URL)",
    )


# --- the base layer --------------------------------------------------------------------------


def _apt_download(b: Build, step: str, package: str, into: Path) -> Path:
    b.run(step, ["apt-get", "download", "-o", "APT::Sandbox::User=root", package], cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise ImageBuildError(step, f"apt-get download {package} produced no .deb", b.tail())
    return debs[-1]


def _deb_field(b: Build, step: str, deb: Path, field: str) -> str:
    return b.run(step, ["dpkg-deb", "-f", str(deb), field]).strip()


def resolve_modules(moddir: Path, wanted: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(load order of module files relative to moddir, built-in names) from modules.dep."""
    builtin = {
        Path(line.strip()).name.split(".ko")[0].replace("-", "_")
        for line in (moddir / "modules.builtin").read_text().splitlines()
        if line.strip()
    }
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    order: list[str] = []
    skipped: list[str] = []

    def visit(mod: str, trail: tuple[str, ...]) -> None:
        if mod in order:
            return
        if mod in trail:
            raise ValueError(f"module dependency cycle: {' -> '.join(trail + (mod,))}")
        for dep in deps.get(mod, []):
            visit(dep, trail + (mod,))
        order.append(mod)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            skipped.append(name)
        elif key in by_name:
            visit(by_name[key], ())
        else:
            raise ValueError(f"kernel module {name!r} is neither built in nor in modules.dep")
    return order, skipped


def _read_module(path: Path) -> bytes:
    """A module file, decompressed if the kernel package ships .ko.xz / .ko.zst."""
    if path.suffix == ".xz":
        import lzma

        return lzma.decompress(path.read_bytes())
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    if path.suffix == ".gz":
        import gzip

        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def _prune(rootfs: Path, patterns: tuple[str, ...]) -> int:
    removed = 0
    for pattern in patterns:
        for hit in glob.glob(str(rootfs / pattern)):
            p = Path(hit)
            if p.name == "copyright":  # licences stay
                continue
            # A path can be gone already: reached earlier through a symlinked directory.
            with contextlib.suppress(FileNotFoundError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed += 1
    return removed


def build_base(settings: Settings, recipe: Recipe, b: Build) -> tuple[Path, dict]:
    mirror = debian_mirror(settings, recipe.suite)
    key = base_key(recipe, mirror)
    parent = Path(settings.cache) / "base"
    final = parent / f"{recipe.name}-{key}"
    if (final / "base.json").is_file():
        info = json.loads((final / "base.json").read_text())
        b.say(f"reusing base layer {final.name} (made {info.get('built_at', '?')})")
        return final, info | {"reused": True}
    mkdir_public(parent, Path(settings.cache))
    clean_partials(parent)
    work = parent / f".{final.name}.partial-{os.getpid()}"
    safe_rmtree(work)
    work.mkdir()
    t0 = time.monotonic()
    try:
        rootfs = work / "rootfs"
        with b.step("debootstrap"):
            b.say(f"debootstrap {recipe.suite} from {mirror} (takes a few minutes)")
            b.run(
                "debootstrap",
                [
                    "debootstrap",
                    f"--variant={recipe.variant}",
                    "--include=" + ",".join(recipe.include),
                    "--components=main",
                    recipe.suite,
                    str(rootfs),
                    mirror,
                ],
            )
            for mnt in mounts_under(rootfs):  # debootstrap unmounts these itself; be sure
                subprocess.run(["umount", "-l", mnt], check=False)
        debootstrap_s = time.monotonic() - t0
        with b.step("prune"):
            n = _prune(rootfs, recipe.prune)
            b.log(f"pruned {n} paths")
        if recipe.matplotlib_font_cache:
            with b.step("matplotlib font cache"):
                cache = rootfs / GUEST_MPL_CACHE.lstrip("/")
                cache.mkdir(parents=True, exist_ok=True)
                code = "import matplotlib.font_manager"
                b.run(
                    "matplotlib font cache",
                    [
                        "chroot", str(rootfs), "/usr/bin/env", "-i", "PATH=/usr/bin:/bin",
                        "HOME=/tmp", f"MPLCONFIGDIR={GUEST_MPL_CACHE}", "MPLBACKEND=Agg",
                        "python3", "-c", code,
                    ],
                )  # fmt: skip
                for p in cache.iterdir():
                    p.chmod(0o644)
        downloads = work / "downloads"
        downloads.mkdir()
        kernel_dir = work / "kernel"
        with b.step("kernel"):
            meta = _apt_download(b, "kernel", recipe.kernel_package, downloads)
            depends = _deb_field(b, "kernel", meta, "Depends")
            real = next(
                (d.split()[0] for d in depends.split(",") if d.strip().startswith("linux-image-")),
                None,
            )
            if real is None:
                raise ImageBuildError(
                    "kernel", f"{meta.name} depends on no linux-image-* package: {depends!r}"
                )
            deb = _apt_download(b, "kernel", real, downloads)
            pkg_version = _deb_field(b, "kernel", deb, "Version")
            unpacked = work / "kernel-unpacked"
            b.run("kernel", ["dpkg", "-x", str(deb), str(unpacked)])
            (release,) = [p.name for p in (unpacked / "lib/modules").iterdir()]
            b.run("kernel", ["depmod", "-b", str(unpacked), release])
            moddir = unpacked / "lib/modules" / release
            order, builtin = resolve_modules(moddir, recipe.modules)
            (kernel_dir / "modules").mkdir(parents=True)
            names = []
            for rel in order:
                name = Path(rel).name.split(".ko")[0]
                (kernel_dir / "modules" / f"{name}.ko").write_bytes(_read_module(moddir / rel))
                names.append(name)
            (kernel_dir / "modules" / "load-order").write_text("\n".join(names) + "\n")
            shutil.copy2(unpacked / "boot" / f"vmlinuz-{release}", kernel_dir / KERNEL_FILE)
            shutil.copy2(unpacked / "boot" / f"config-{release}", kernel_dir / "config")
            shutil.rmtree(unpacked)
            b.log(f"kernel {release} ({pkg_version}); modules {names}; built in {builtin}")
        with b.step("busybox"):
            deb = _apt_download(b, "busybox", "busybox-static", downloads)
            bb_version = _deb_field(b, "busybox", deb, "Version")
            unpacked = work / "busybox-unpacked"
            b.run("busybox", ["dpkg", "-x", str(deb), str(unpacked)])
            shutil.copy2(unpacked / "bin" / "busybox", work / "busybox")
            shutil.rmtree(unpacked)
        shutil.rmtree(downloads)
        info = {
            "key": key,
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "mirror": mirror,
            "suite": recipe.suite,
            "include": list(recipe.include),
            "kernel": {
                "package": real,
                "package_version": pkg_version,
                "release": release,
                "modules": names,
                "builtin": builtin,
            },
            "busybox_version": bb_version,
            "debootstrap_seconds": round(debootstrap_s, 1),
            "seconds": round(time.monotonic() - t0, 1),
        }
        (work / "base.json").write_text(json.dumps(info, indent=2) + "\n")
        work.chmod(0o755)
        work.rename(final)
    except BaseException:
        safe_rmtree(work)
        raise
    # Older base layers of this recipe are never used again (1-2 GB each).
    for old in parent.glob(f"{recipe.name}-*"):
        if old != final:
            safe_rmtree(old)
    return final, info | {"reused": False}
