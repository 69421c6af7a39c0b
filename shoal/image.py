"""Guest images: build one from its recipe (vm-images/NAME/), find a built one in the cache.

An image is three files plus a manifest, in `<cache>/images/<name>-<recipe hash>/`:

    vmlinuz       Debian's cloud kernel, booted directly (no boot loader)
    initrd.img    busybox + the virtio modules; mounts /dev/vda read-only, switch_roots
    rootfs.ext4   the root file system (read-only at runtime), made without mounting anything
    manifest.json what is inside (kernel, Python and Debian package versions), sizes, timings

It is built in two layers so that changing the agent does not re-run debootstrap:

    base   `<cache>/base/<name>-<base key>/`: debootstrap'd root + kernel + busybox, keyed by the
           package list, the mirror and the kernel package. Minutes to make; made rarely.
    final  the image itself, keyed by the recipe hash (recipe, vm-images/common, the agent,
           shoal/protocol.py, this module). A hard-linked copy of the base root, plus the agent and
           init scripts, packed with `mkfs.ext4 -d`. About a minute.

Every step runs in a scratch directory next to its destination, renamed into place only when
complete, so a failed or interrupted build never leaves a half-written image in the cache.
The guest side of the contract (devices, command line, init) is described in docs/guest-image.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
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

# Bump when the build changes what it produces. FINAL_FORMAT is also covered by hashing this file.
BASE_FORMAT = 1
FINAL_FORMAT = 1
# Guest paths.
GUEST_INIT = "/opt/shoal/init"
GUEST_AGENT_DIR = "/opt/shoal/agent"
GUEST_MPL_CACHE = "/opt/shoal/mpl-cache"

KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
ROOTFS_FILE = "rootfs.ext4"
MANIFEST_FILE = "manifest.json"
HEARTBEAT_S = 10.0  # a progress line at least this often during long steps
KEEP_IMAGES = 3  # built images kept per recipe, the newest included (older ones are deleted)

Progress = Callable[[str], None]


class ImageBuildError(Exception):
    """A build step failed. `step` names it; the message carries the tail of its output."""

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


def _tree_files(root: Path) -> list[Path]:
    """Files under root that go into an image, sorted; caches and dotfiles are not part of it."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") or part == "__pycache__" for part in rel):
            continue
        if p.is_file() or p.is_symlink():
            out.append(p)
    return sorted(out)


def _agent_files(agent_src: Path) -> list[Path]:
    return sorted(p for p in agent_src.glob("*.py") if p.is_file())


def _hash_inputs(recipe: Recipe, agent_src: Path) -> list[Path]:
    files = _tree_files(recipe.dir) + _tree_files(COMMON_SRC) + _agent_files(agent_src)
    return files + [Path(protocol.__file__).resolve(), Path(__file__).resolve()]


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


# --- lookup ----------------------------------------------------------------------------------


def images_dir(settings: Settings) -> Path:
    return Path(settings.cache) / "images"


def _artifacts(name: str, directory: Path, rhash: str) -> ImageArtifacts:
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
    art = _artifacts(name, images_dir(settings) / f"{name}-{rhash}", rhash)
    if all(p.is_file() for p in (art.kernel, art.initrd, art.rootfs, art.manifest)):
        return art
    return None


def kernel_cmdline(settings: Settings) -> str:
    """The full command line for a guest: the constant part plus per-VM settings."""
    return f"{KERNEL_CMDLINE} shoal.tmp_mib={int(settings.tmp_mib)}"


# --- running steps ---------------------------------------------------------------------------


class _Build:
    """Progress reporting and subprocess running for one build, with one log file."""

    def __init__(self, name: str, progress: Progress, log_path: Path) -> None:
        self.name = name
        self.progress = progress
        self.log_path = log_path
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}

    def say(self, msg: str) -> None:
        self.progress(f"[image {self.name} {time.monotonic() - self.t0:6.1f}s] {msg}")

    def log(self, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    @contextlib.contextmanager
    def step(self, step: str) -> Iterator[None]:
        self.say(f"{step} ...")
        self.log(f"=== {step}")
        t = time.monotonic()
        try:
            yield
        except ImageBuildError:
            raise
        except Exception as exc:  # an OSError, a parse error: name the step it happened in
            raise ImageBuildError(step, f"{type(exc).__name__}: {exc}", self.tail()) from exc
        took = time.monotonic() - t
        self.timings[step] = round(took, 1)
        self.say(f"{step} done in {took:.1f}s")

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def run(self, step: str, argv: list[str], *, cwd: Path | None = None) -> str:
        """Run argv, its output going to the log; a line every HEARTBEAT_S; raise on failure."""
        self.log("$ " + " ".join(argv))
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
        with self.log_path.open("ab") as out:
            try:
                # Own process group: an interrupted build kills debootstrap's dpkg/chroot too.
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ImageBuildError(step, f"cannot run {argv[0]}: {exc}") from None
            t = time.monotonic()
            next_beat = t + HEARTBEAT_S
            try:
                while True:
                    try:
                        rc = proc.wait(timeout=1.0)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if time.monotonic() >= next_beat:
                        next_beat += HEARTBEAT_S
                        last = self.tail(1).strip()[:100]
                        self.say(f"{step}: {time.monotonic() - t:.0f}s ... {last}")
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        with self.log_path.open("rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace")
        if rc != 0:
            raise ImageBuildError(step, f"{argv[0]} exited with status {rc}", self.tail())
        return output


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].encode().decode("unicode_escape")
            if mnt.startswith(prefix):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def _safe_rmtree(path: Path) -> None:
    """rmtree that first unmounts anything debootstrap left mounted below (its /proc, /dev)."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    for mnt in _mounts_under(path):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    left = _mounts_under(path)
    if left:
        raise ImageBuildError("cleanup", f"refusing to delete {path}: still mounted: {left}")
    shutil.rmtree(path, ignore_errors=True)


def _mkdir_public(path: Path, top: Path) -> None:
    """Make path (under top, ours) traversable by QEMU, which runs as user libvirt-qemu.

    Directories from top down are made 0755; one above top that others cannot enter is an error
    (it is not ours to change).
    """
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if mode & 0o005 == 0o005:
            continue
        if p == top or top in p.parents:
            p.chmod(mode | 0o755)
        else:
            raise ImageBuildError(
                "cache",
                f"{p} is not traversable by other users (mode {oct(mode & 0o777)}); QEMU "
                f"runs as libvirt-qemu and needs o+rx on every directory above {path}",
            )


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clean_partials(parent: Path) -> None:
    """Remove scratch directories of builds that died (their pid is gone)."""
    for p in parent.glob(".*.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _safe_rmtree(p)


def _replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file in the staged root, never through a hard link into the base layer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(data)
    path.chmod(mode)
    os.chown(path, 0, 0)


# --- the base layer --------------------------------------------------------------------------


def _apt_download(b: _Build, step: str, package: str, into: Path) -> Path:
    b.run(step, ["apt-get", "download", "-o", "APT::Sandbox::User=root", package], cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise ImageBuildError(step, f"apt-get download {package} produced no .deb", b.tail())
    return debs[-1]


def _deb_field(b: _Build, step: str, deb: Path, field: str) -> str:
    return b.run(step, ["dpkg-deb", "-f", str(deb), field]).strip()


def _resolve_modules(moddir: Path, wanted: tuple[str, ...]) -> tuple[list[str], list[str]]:
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


def _build_base(settings: Settings, recipe: Recipe, b: _Build) -> tuple[Path, dict]:
    mirror = debian_mirror(settings, recipe.suite)
    key = base_key(recipe, mirror)
    parent = Path(settings.cache) / "base"
    final = parent / f"{recipe.name}-{key}"
    if (final / "base.json").is_file():
        info = json.loads((final / "base.json").read_text())
        b.say(f"reusing base layer {final.name} (made {info.get('built_at', '?')})")
        return final, info | {"reused": True}
    _mkdir_public(parent, Path(settings.cache))
    _clean_partials(parent)
    work = parent / f".{final.name}.partial-{os.getpid()}"
    _safe_rmtree(work)
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
            for mnt in _mounts_under(rootfs):  # debootstrap unmounts these itself; be sure
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
            order, builtin = _resolve_modules(moddir, recipe.modules)
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
        _safe_rmtree(work)
        raise
    # Older base layers of this recipe are never used again (1-2 GB each).
    for old in parent.glob(f"{recipe.name}-*"):
        if old != final:
            _safe_rmtree(old)
    return final, info | {"reused": False}


# --- the final layer -------------------------------------------------------------------------


def _copy_overlay(src: Path, rootfs: Path) -> None:
    """Copy vm-images/.../rootfs/ into the staged root: root-owned, modes from the repo."""
    if not src.is_dir():
        return
    for path in _tree_files(src):
        rel = path.relative_to(src)
        mode = 0o755 if os.access(path, os.X_OK) else 0o644
        _replace_file(rootfs / rel, path.read_bytes(), mode)


def _add_user(rootfs: Path) -> None:
    etc = rootfs / "etc"
    u, g = DATA_UID, DATA_UID
    entries = {
        "passwd": f"{SANDBOX_USER}:x:{u}:{g}:Shoal sandbox:/tmp:/bin/bash",
        "group": f"{SANDBOX_USER}:x:{g}:",
        "shadow": f"{SANDBOX_USER}:!:19000:0:99999:7:::",
        "gshadow": f"{SANDBOX_USER}:!::",
    }
    for fname, line in entries.items():
        path = etc / fname
        old = path.read_text() if path.exists() else ""
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        kept = [x for x in old.splitlines() if x.split(":", 1)[0] != SANDBOX_USER]
        _replace_file(path, ("\n".join(kept + [line]) + "\n").encode(), mode)
        if fname in ("shadow", "gshadow"):
            os.chown(path, 0, 42)  # group shadow, as Debian has it


def _install_agent(rootfs: Path, agent_src: Path) -> list[str]:
    files = _agent_files(agent_src)
    if not any(p.name == "agent.py" for p in files):
        raise ImageBuildError("agent", f"no agent.py in {agent_src}: the image needs the agent")
    dest = rootfs / GUEST_AGENT_DIR.lstrip("/")
    for p in files:
        _replace_file(dest / p.name, p.read_bytes())
    _replace_file(dest / "shoal" / "__init__.py", b"")
    _replace_file(dest / "shoal" / "protocol.py", Path(protocol.__file__).read_bytes())
    return [p.name for p in files] + ["shoal/__init__.py", "shoal/protocol.py"]


def _build_initramfs(b: _Build, base: Path, out: Path, work: Path) -> None:
    stage = work / "initramfs"
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(base / "busybox", stage / "bin" / "busybox")
    (stage / "bin" / "busybox").chmod(0o755)
    (stage / "bin" / "sh").symlink_to("busybox")
    shutil.copy2(COMMON_SRC / "initramfs-init", stage / "init")
    (stage / "init").chmod(0o755)
    for p in (base / "kernel" / "modules").iterdir():
        shutil.copy2(p, stage / "lib" / "modules" / p.name)
    os.mknod(stage / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
    os.mknod(stage / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    # Uncompressed: the kernel would spend longer unpacking it under TCG than QEMU loading it.
    listing = "\n".join(sorted(str(p.relative_to(stage)) for p in stage.rglob("*")))
    b.log(listing)
    with out.open("wb") as f:
        proc = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0", "--reproducible"],
            cwd=stage,
            input=(listing + "\n").encode(),
            stdout=f,
            stderr=subprocess.PIPE,
        )
    if proc.returncode != 0:
        raise ImageBuildError("initramfs", "cpio failed", proc.stderr.decode(errors="replace"))
    shutil.rmtree(stage)


def _dpkg_packages(rootfs: Path) -> dict[str, str]:
    status = (rootfs / "var/lib/dpkg/status").read_text()
    pkgs = {}
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            pkgs[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(pkgs.items()))


def _python_info(rootfs: Path, debs: dict[str, str]) -> dict:
    exe = os.readlink(rootfs / "usr/bin/python3")  # "python3.11"
    minor = exe.removeprefix("python")
    deb_version = debs.get(f"{exe}-minimal") or debs.get(exe, "")
    version = re.sub(r"^\d+:", "", deb_version).split("-")[0].split("+")[0]
    paths = [
        str(rootfs / "usr/lib/python3/dist-packages"),
        str(rootfs / f"usr/lib/{exe}"),
        str(rootfs / f"usr/local/lib/{exe}/dist-packages"),
    ]
    packages = {}
    for dist in importlib.metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name:
            packages[re.sub(r"[-_.]+", "-", name).lower()] = dist.version
    return {
        "version": version or minor,
        "executable": f"/usr/bin/{exe}",
        "packages": dict(sorted(packages.items())),
    }


def _content_size(root: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inode count) of a tree, hard links counted once."""
    blocks = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        blocks += 1
        inodes += 1
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if not os.path.islink(os.path.join(dirpath, name)) or st.st_size > 59:
                blocks += math.ceil(st.st_size / 4096)
    return blocks * 4096, inodes


def _make_rootfs(b: _Build, recipe: Recipe, rootfs: Path, out: Path, rhash: str) -> dict:
    content, inodes = _content_size(rootfs)
    n_inodes = int(inodes * 1.1) + 4096
    # ext4 metadata: inode tables (256 B each), bitmaps, group descriptors, extent blocks: ~5%.
    size = int(content * 1.05) + n_inodes * 256 + recipe.headroom_mib * 2**20
    fs_uuid = str(uuid.UUID(hashlib.sha256(rhash.encode()).hexdigest()[:32]))
    for attempt in range(3):
        size_mib = math.ceil(size / 2**20)
        if out.exists():
            out.unlink()
        argv = [
            "mkfs.ext4", "-q", "-F", "-t", "ext4", "-L", "shoal-root", "-U", fs_uuid,
            "-m", "0", "-N", str(n_inodes), "-O", "^has_journal",
            "-E", "root_owner=0:0,lazy_itable_init=0",
            "-d", str(rootfs), str(out), f"{size_mib}M",
        ]  # fmt: skip
        try:
            b.run("mkfs.ext4", argv)
            break
        except ImageBuildError as exc:
            if attempt == 2 or "space" not in exc.output_tail.lower():
                raise
            b.say(f"mkfs.ext4: {size_mib} MiB was too small, retrying 25% larger")
            size = int(size * 1.25)
    return {"content_bytes": content, "inodes": n_inodes, "size_mib": size_mib}


def _build_final(
    recipe: Recipe, rhash: str, b: _Build, work: Path, base: Path, agent_src: Path
) -> dict:
    rootfs = work / "rootfs"
    with b.step("stage root"):
        # Hard links: a second copy of the base root costs seconds and no space. Files that
        # change are replaced (unlinked, rewritten), never written through the link.
        b.run("stage root", ["cp", "-al", str(base / "rootfs"), str(rootfs)])
        _copy_overlay(COMMON_SRC / "rootfs", rootfs)
        _copy_overlay(recipe.dir / "rootfs", rootfs)
        _add_user(rootfs)
        data = rootfs / DATA_MOUNT.lstrip("/")
        data.mkdir(parents=True, exist_ok=True)
        os.chown(data, DATA_UID, DATA_UID)
        data.chmod(0o755)
    with b.step("agent"):
        _replace_file(
            rootfs / GUEST_INIT.lstrip("/"), (COMMON_SRC / "guest-init").read_bytes(), 0o755
        )
        agent_files = _install_agent(rootfs, agent_src)
        # Byte-compile with the guest's own interpreter (the root is read-only at runtime).
        b.run(
            "agent",
            ["chroot", str(rootfs), "/usr/bin/python3", "-m", "compileall", "-q", GUEST_AGENT_DIR],
        )
    with b.step("initramfs"):
        _build_initramfs(b, base, work / INITRD_FILE, work)
        shutil.copy2(base / "kernel" / KERNEL_FILE, work / KERNEL_FILE)
    with b.step("manifest"):
        debs = _dpkg_packages(rootfs)
        python = _python_info(rootfs, debs)
    with b.step("mkfs.ext4"):
        fs = _make_rootfs(b, recipe, rootfs, work / ROOTFS_FILE, rhash)
    with b.step("cleanup"):
        _safe_rmtree(rootfs)
    sizes = {
        "rootfs_bytes": (work / ROOTFS_FILE).stat().st_size,
        "rootfs_allocated_bytes": (work / ROOTFS_FILE).stat().st_blocks * 512,
        "rootfs_content_bytes": fs["content_bytes"],
        "rootfs_inodes": fs["inodes"],
        "kernel_bytes": (work / KERNEL_FILE).stat().st_size,
        "initrd_bytes": (work / INITRD_FILE).stat().st_size,
    }
    return {
        "agent_files": agent_files,
        "debs": debs,
        "python": python,
        "sizes": sizes,
    }


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
    art = _artifacts(name, final, rhash)
    if not force and art.manifest.is_file():
        progress(f"[image {name}] {final} is up to date")
        return final
    _mkdir_public(parent, _dest or Path(settings.cache))
    with _lock(parent / f".lock-{name}"):
        if not force and art.manifest.is_file():  # someone else built it while we waited
            progress(f"[image {name}] {final} is up to date")
            return final
        _clean_partials(parent)
        work = parent / f".{final.name}.partial-{os.getpid()}"
        _safe_rmtree(work)
        work.mkdir()
        b = _Build(name, progress, work / "build.log")
        b.say(f"building {final.name} in {parent}")
        t0 = time.monotonic()
        try:
            if force:
                mirror = debian_mirror(settings, recipe.suite)
                _safe_rmtree(Path(settings.cache) / "base" / f"{name}-{base_key(recipe, mirror)}")
            base, base_info = _build_base(settings, recipe, b)
            out = _build_final(recipe, rhash, b, work, base, _agent_src)
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
                _safe_rmtree(old)
            else:
                work.rename(final)
        except BaseException as exc:
            failed_log = parent / f"{final.name}.failed.log"
            with contextlib.suppress(OSError):
                shutil.copy2(work / "build.log", failed_log)
            _safe_rmtree(work)
            if isinstance(exc, ImageBuildError) and failed_log.exists():
                exc.log_path = failed_log
            raise
        with contextlib.suppress(OSError):
            (parent / f"{final.name}.failed.log").unlink()
        _prune_old_images(parent, name, final, b)
        b.say(f"built {final} in {seconds:.0f}s (rootfs {out['sizes']['rootfs_bytes'] >> 20} MiB)")
    return final


def _prune_old_images(parent: Path, name: str, keep_dir: Path, b: _Build) -> None:
    """Keep the KEEP_IMAGES newest images of this recipe (each is ~1.5 GB; every agent change
    makes one). A running VM keeps its open files; templates are keyed by recipe hash anyway."""
    built = sorted(
        (p for p in parent.glob(f"{name}-*") if (p / MANIFEST_FILE).is_file()),
        key=lambda p: (p / MANIFEST_FILE).stat().st_mtime,
        reverse=True,
    )
    for old in [p for p in built if p != keep_dir][KEEP_IMAGES - 1 :]:
        b.say(f"removing old image {old.name}")
        _safe_rmtree(old)


# --- the data disk ---------------------------------------------------------------------------

DATA_FORMAT = 1


def data_disk_base(settings: Settings, size_mib: int) -> Path:
    """A sparse, formatted ext4 file of size_mib, root directory owned by 1000:1000, cached.

    Per-session disks are qcow2 overlays on it: `qemu-img create -f qcow2 -b BASE -F raw X`.
    """
    if size_mib < 16:
        raise ValueError(f"data disk of {size_mib} MiB is too small (16 MiB at least)")
    parent = Path(settings.cache) / "data"
    final = parent / f"data-{size_mib}m-v{DATA_FORMAT}.ext4"
    if final.is_file():
        return final
    _mkdir_public(parent, Path(settings.cache))
    with _lock(parent / ".lock"):
        if final.is_file():
            return final
        tmp = parent / f".{final.name}.partial-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            # Inode tables and journal written now, once: with lazy init the guest kernel would
            # zero them in the background after every boot, writing into each session's overlay.
            ext = f"root_owner={DATA_UID}:{DATA_UID},lazy_itable_init=0,lazy_journal_init=0"
            subprocess.run(
                [
                    "mkfs.ext4", "-q", "-F", "-t", "ext4", "-L", "shoal-data", "-m", "0",
                    "-E", ext, str(tmp), f"{size_mib}M",
                ],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            # An empty /mnt/data for the user: lost+found is recreated by e2fsck if ever needed.
            subprocess.run(
                ["debugfs", "-w", "-R", "rmdir lost+found", str(tmp)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            tmp.chmod(0o644)
            tmp.rename(final)
        except subprocess.CalledProcessError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise ImageBuildError(
                "data disk", f"{exc.cmd[0]} exited with {exc.returncode}", exc.stderr or ""
            ) from None
    return final
