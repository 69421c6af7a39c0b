"""Snapshot templates: one warmed, saved guest per (image, shape), cloned for each VM.

Building a template (`TemplateStore.ensure`, with the build itself in
workers/template_builder.py): boot one guest, import numpy, pandas and matplotlib through its
agent, disconnect, and `virDomainSave` it to state.save. From then on the template's data
overlay (data.qcow2) is never written again: every clone gets its own qcow2 overlay backed by
it.

Cloning (`prepare_clone`): libvirt refuses to restore a save image under another name or uuid,
and one image cannot be restored twice at once as it is. So each clone copies state.save,
rewrites the name and uuid inside the copy's embedded domain XML (same-length replacements:
clone names have the template name's length, see workers/domain.py), and restores the copy
with an alternate XML (the template's saved XML retargeted to the clone's disk, socket and
console log). The copy is deleted once restored.

Ownership. The template's guest runs under a uid of its own while it is built (its build
directory is that uid's, workers/vm_identity.py); once saved, `seal` gives every file back to
root: the data disk 0644 (every clone's QEMU opens it read-only, as the backing file of its
overlay), everything else 0600 (libvirtd reads the save image as root). No VM's uid can write
a template file.

On disk, under <instance_vm_dir>/templates/:
    <image>-<key>/          a ready template: state.save, data.qcow2, domain.xml, meta.json
    .building-<key>/        a build in progress (or a crashed one, cleaned by the next build)
    <image>-<key>.lock      flock(2): one builder per template across processes and threads
The key hashes everything that must match for a restore to work or to be what the pool asked
for: the image recipe hash, the shape (vCPUs, memory, data disk, network, CPU quota), the
accelerator and TCG cache, the guest kernel command line, and the QEMU and libvirt versions. A
change to any of them means a new key, hence a rebuild; once it is ready, the older templates
of the same image and shape are removed (clones restored from them keep their open files).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.settings import Settings
from workers import sleep_images
from workers.transfer_disk import FILE_NAME as TRANSFER_DISK_FILE
from workers.vm_errors import TemplateError

log = logging.getLogger("shoal.templates")

# Bump when what a template holds, or how it is made, changes (2: guest RAM not mergeable;
# 3: a transfer disk, vdc, whose device state the save holds).
TEMPLATE_FORMAT = 3
# What a template's guest runs before it is saved: every clone starts with these imported.
WARM_CODE = "import numpy, pandas, matplotlib\nimport matplotlib.pyplot\nimport gc\ngc.collect()\n"
WARM_TIMEOUT_S = 300
LOCK_WAIT_S = 900.0

# The save image header of libvirt's QEMU driver (src/qemu/qemu_saveimage.h), host byte order:
# magic[16], version, data_len, was_running, compressed, cookieOffset, unused[14].
SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER = struct.Struct("=16s19I")
SAVE_VERSION = 2

STATE_FILE = "state.save"
DISK_FILE = "data.qcow2"
XML_FILE = "domain.xml"
META_FILE = "meta.json"


def rewrite_save_image(path: Path, replacements: dict[str, str]) -> None:
    """Replace strings inside a save image's embedded domain XML, in place.

    Each replacement must have the same length in UTF-8 as what it replaces, so that every
    offset in the image stays valid; each must occur at least once.
    """
    with open(path, "r+b") as f:
        header = f.read(SAVE_HEADER.size)
        if len(header) != SAVE_HEADER.size:
            raise TemplateError(f"{path} is too short to be a libvirt save image")
        magic, version, data_len, _running, _compressed, cookie_offset, *_ = SAVE_HEADER.unpack(
            header
        )
        if magic != SAVE_MAGIC:
            raise TemplateError(f"{path} is not a libvirt QEMU save image (magic {magic!r})")
        if version != SAVE_VERSION:
            raise TemplateError(f"{path}: save image version {version}, expected {SAVE_VERSION}")
        xml_region = cookie_offset if cookie_offset else data_len
        region = f.read(xml_region)
        end = region.find(b"\0")
        xml = region[: end if end >= 0 else len(region)]
        for old, new in replacements.items():
            old_b, new_b = old.encode(), new.encode()
            if len(old_b) != len(new_b):
                raise TemplateError(
                    f"save image rewrite needs same-length strings: {old!r} -> {new!r}"
                )
            if old_b not in xml:
                raise TemplateError(f"{old!r} is not in the save image's domain XML")
            xml = xml.replace(old_b, new_b)
        f.seek(SAVE_HEADER.size)
        f.write(xml)


def saved_xml(path: Path) -> str:
    """The domain XML embedded in a save image (for tests and debugging)."""
    with open(path, "rb") as f:
        header = f.read(SAVE_HEADER.size)
        _magic, _version, data_len, _r, _c, cookie_offset, *_ = SAVE_HEADER.unpack(header)
        region = f.read(cookie_offset or data_len)
    return region.split(b"\0", 1)[0].decode()


@dataclass(frozen=True)
class Template:
    key: str
    image: str
    dir: Path
    domain_name: str
    uuid: str
    xml: str  # the saved domain definition, as libvirt wrote it
    meta: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def data_disk(self) -> Path:
        return self.dir / DISK_FILE


def seal(directory: Path) -> None:
    """A template's files, root's and read-only for VMs: see the module docstring. The build
    VM's transfer disk goes: every clone is given its own."""
    for path in directory.iterdir():
        if path.is_symlink() or not path.is_file() or path.name == TRANSFER_DISK_FILE:
            if not path.is_dir():
                path.unlink()  # a socket left behind, the build VM's transfer disk
            continue
        os.chown(path, 0, 0)
        os.chmod(path, 0o644 if path.name == DISK_FILE else 0o600)
    os.chown(directory, 0, 0)
    os.chmod(directory, 0o711)


def template_key(parts: dict[str, Any]) -> str:
    """`t` + 11 hex digits: a template's domain key (workers/domain.py naming)."""
    blob = json.dumps({"format": TEMPLATE_FORMAT, **parts}, sort_keys=True).encode()
    return "t" + hashlib.sha256(blob).hexdigest()[:11]


def shape_group(image: str, shape: dict[str, Any]) -> str:
    """Templates of one image and shape: a newer one replaces the older ones."""
    blob = json.dumps({"image": image, **shape}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class TemplateStore:
    """Finds, builds and clones templates of this instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.instance_vm_dir / "templates"
        self._lock = threading.Lock()
        self._state: dict[str, dict[str, Any]] = {}  # key -> state for status()
        self._cache: dict[str, Template] = {}

    def dir_for(self, image: str, key: str) -> Path:
        return self.root / f"{image}-{key}"

    # --- finding -----------------------------------------------------------------------------
    def find(self, image: str, key: str) -> Template | None:
        """The ready template, or None."""
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached.state.is_file() and cached.data_disk.is_file():
            return cached
        directory = self.dir_for(image, key)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            xml = (directory / XML_FILE).read_text()
        except (OSError, ValueError):
            return None
        if meta.get("key") != key or not (directory / STATE_FILE).is_file():
            return None
        seal(directory)  # cheap; a template an older Shoal built may be libvirt-qemu's
        template = Template(
            key=key,
            image=image,
            dir=directory,
            domain_name=meta["domain_name"],
            uuid=meta["uuid"],
            xml=xml,
            meta=meta,
        )
        with self._lock:
            self._cache[key] = template
            self._state.setdefault(key, {}).update(
                {"image": image, "state": "ready", "path": str(directory)}
            )
        return template

    def forget(self, key: str, reason: str) -> None:
        """A template that failed to restore: drop it so the next ensure rebuilds it."""
        with self._lock:
            template = self._cache.pop(key, None)
            self._state.setdefault(key, {}).update({"state": "broken", "error": reason})
        if template is not None:
            log.error("template %s is broken (%s): removing it", key, reason)
            shutil.rmtree(template.dir, ignore_errors=True)

    # --- building ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, image: str, key: str) -> Iterator[None]:
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        lock_path = self.root / f"{image}-{key}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TemplateError(
                            f"template {key}: another builder held {lock_path} for "
                            f"{LOCK_WAIT_S:.0f} s"
                        ) from None
                    time.sleep(0.5)
            yield
        finally:
            os.close(fd)

    def being_built(self, key: str) -> bool:
        """Whether some process (this one included) holds a build lock of template `key`.

        A template domain nobody is building was left by a builder that died: reconcile
        destroys it."""
        for lock_path in self.root.glob(f"*-{key}.lock"):
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            finally:
                os.close(fd)  # closing the descriptor releases a lock we took
        return False

    def remove_partial(self, key: str) -> None:
        shutil.rmtree(self.root / f".building-{key}", ignore_errors=True)

    def ensure(
        self,
        image: str,
        key: str,
        group: str,
        describe: dict[str, Any],
        build_vm: Callable[[Path], tuple[str, str]],
    ) -> Template:
        """Return the ready template `key`, building it first if needed.

        build_vm(building_dir) boots and warms a guest whose overlay, socket and console live in
        building_dir, saves it to building_dir/state.save and returns (domain name, uuid).
        """
        template = self.find(image, key)
        if template is not None:
            return template
        with self._flock(image, key):
            template = self.find(image, key)  # built by someone else while we waited
            if template is not None:
                return template
            building = self.root / f".building-{key}"
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(mode=0o711)
            started = time.monotonic()
            with self._lock:
                self._state[key] = {
                    "image": image,
                    "state": "building",
                    "since": time.time(),
                    **describe,
                }
            try:
                name, uuid = build_vm(building)
                if not (building / XML_FILE).is_file() or not (building / STATE_FILE).is_file():
                    raise TemplateError(f"template {key}: the build left no save image or XML")
                meta = {
                    "key": key,
                    "group": group,
                    "image": image,
                    "domain_name": name,
                    "uuid": uuid,
                    "built_at": time.time(),
                    "build_s": round(time.monotonic() - started, 1),
                    **describe,
                }
                (building / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
                with contextlib.suppress(FileNotFoundError):
                    (building / "agent.sock").unlink()
                seal(building)
                final = self.dir_for(image, key)
                shutil.rmtree(final, ignore_errors=True)
                building.rename(final)
            except BaseException as exc:
                shutil.rmtree(building, ignore_errors=True)
                with self._lock:
                    self._state[key].update({"state": "failed", "error": str(exc)})
                if isinstance(exc, TemplateError):
                    raise
                if isinstance(exc, Exception):
                    raise TemplateError(f"building template {key} of {image}: {exc}") from exc
                raise
            log.info("template %s of %s built in %.1f s at %s", key, image, meta["build_s"], final)
            self._remove_older(group, key)
        template = self.find(image, key)
        if template is None:
            raise TemplateError(f"template {key} vanished right after it was built")
        return template

    def _remove_older(self, group: str, keep: str) -> None:
        needed = sleep_images.needed_backing_files(self.settings)
        for directory in self.root.iterdir():
            if not directory.is_dir() or directory.name.startswith("."):
                continue
            try:
                meta = json.loads((directory / META_FILE).read_text())
            except (OSError, ValueError):
                continue
            if meta.get("group") == group and meta.get("key") != keep:
                if str(directory / DISK_FILE) in needed:
                    log.info("keeping template %s: a sleeping session's or a fork base's disk "
                             "is based on it", meta.get("key"))  # fmt: skip
                    continue
                log.info("removing template %s, replaced by %s", meta.get("key"), keep)
                shutil.rmtree(directory, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    (self.root / f"{directory.name}.lock").unlink()
                with self._lock:
                    self._cache.pop(meta.get("key", ""), None)
                    self._state.pop(meta.get("key", ""), None)

    # --- cloning -----------------------------------------------------------------------------
    def prepare_clone(self, template: Template, dest: Path, name: str, uuid: str) -> None:
        """Copy the template's save image to dest with the clone's name and uuid inside."""
        if len(name) != len(template.domain_name):
            raise TemplateError(
                f"clone name {name!r} must have the template name's length "
                f"({len(template.domain_name)})"
            )
        shutil.copyfile(template.state, dest)
        os.chmod(dest, 0o600)
        rewrite_save_image(dest, {template.domain_name: name, template.uuid: uuid})

    # --- reporting ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            return {key: dict(value) for key, value in self._state.items()}

    def note_failure(self, key: str, image: str, error: str) -> None:
        with self._lock:
            self._state.setdefault(key, {"image": image}).update(
                {"state": "failed", "error": error}
            )
