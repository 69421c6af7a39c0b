"""Making snapshot templates: boot one guest of an (image, shape), warm it, save it.

workers/templates.py keeps templates on disk (find, lock, clone) and knows nothing of libvirt;
this module makes them, with the domain mechanics of workers/vm_domains.py and the host facts of
workers/vm_probes.py. It also computes the key a template is filed under (image recipe, shape,
accelerator, kernel command line, QEMU and libvirt versions), which VM creation needs too, to
find the template to restore from.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from shoal import images, protocol
from shoal.settings import Settings
from workers import domain as dom
from workers import libvirt_conn, templates
from workers.vm_domains import DomainOps
from workers.vm_errors import TemplateError, VMError
from workers.vm_identity import VMIdentity
from workers.vm_probes import HostProbes

if TYPE_CHECKING:
    from workers.running_vm import VMSpec

log = logging.getLogger("shoal.vm")

# After the template's client disconnects, let the guest agent see it before the snapshot.
TEMPLATE_SETTLE_S = 1.0


class TemplateBuilder:
    """Builds this host's templates; one per VMManager."""

    def __init__(
        self,
        settings: Settings,
        probes: HostProbes,
        domains: DomainOps,
        store: templates.TemplateStore,
    ) -> None:
        self.settings = settings
        self.probes = probes
        self.domains = domains
        self.store = store

    def template_id(
        self, spec: VMSpec, artifacts: images.ImageArtifacts
    ) -> tuple[str, str, dict[str, Any]]:
        """(key, shape group, what the key hashes) of the template for `spec` on this host."""
        choice = self.probes.accel()
        qemu_version, libvirt_version = self.probes.hypervisor_versions()
        shape = spec.shape()
        shape["cpu_quota"] = self.probes.cpu_quota(spec.cpu_quota, spec.vcpus)
        describe = {
            "recipe_hash": artifacts.recipe_hash,
            "shape": shape,
            "accel": choice.kind,
            "tb_cache_mib": self.settings.tb_cache_mib if choice.kind == "tcg" else 0,
            "cmdline": self.domains.cmdline(),
            # Clones keep the template's disk throttle (their XML is the template's, retargeted).
            "disk_iotune": [self.settings.vm_disk_bytes_per_s, self.settings.vm_disk_iops],
            "qemu_version": qemu_version,
            "libvirt_version": libvirt_version,
        }
        key = templates.template_key({"image": spec.image, **describe})
        group = templates.shape_group(spec.image, shape)
        return key, group, describe

    def ensure(self, spec: VMSpec) -> None:
        """Build the (image, shape) template if it is missing or stale. Slow (a boot plus the
        imports: about a minute under TCG); other processes wait on its lock."""
        try:
            artifacts = self.domains.artifacts(spec.image)
            key, group, describe = self.template_id(spec, artifacts)
        except VMError as exc:
            raise TemplateError(f"no template for {spec.image}: {exc}") from exc
        try:
            self.store.ensure(
                spec.image,
                key,
                group,
                describe,
                lambda building: self._build_vm(spec, artifacts, key, building),
            )
        except TemplateError:
            raise
        except VMError as exc:
            self.store.note_failure(key, spec.image, str(exc))
            raise TemplateError(f"template {key} of {spec.image}: {exc}") from exc

    def _make_shareable(
        self,
        who: str,
        building: Path,
        domain: tuple[str, str],
        identity: VMIdentity,
        spec: VMSpec,
        timings: dict[str, float],
    ) -> None:
        """Add the template's memory and device state for clones that share it
        (workers/shared_memory.py); without them clones read the whole snapshot."""
        shared = self.domains.shared
        if not shared.active():
            return
        try:
            with self.domains.step(who, "share", timings):
                shared.make_shareable(
                    self.domains.libvirt,
                    building,
                    *domain,
                    identity,
                    spec.memory_mib,
                    self.domains.make_overlay,
                )
        except (VMError, OSError, ValueError) as exc:
            if isinstance(exc, libvirt_conn.LibvirtUnavailable):
                raise
            log.warning("%s: clones will read the whole snapshot: %s", who, exc)
            with contextlib.suppress(VMError):
                self.domains.destroy_domain(domain[0])

    def _build_vm(
        self, spec: VMSpec, artifacts: images.ImageArtifacts, key: str, building: Path
    ) -> tuple[str, str]:
        """Boot, warm and save the template guest into `building`; (domain name, uuid)."""
        name = dom.domain_name(self.settings, key)
        uuid = str(uuidlib.uuid4())
        paths = dom.VMPaths(building)
        who = f"template-{key}"
        timings: dict[str, float] = {}
        domains = self.domains
        domains.destroy_domain(name)  # left by a builder that crashed
        metadata = {"template": key, "image": spec.image, "created_at": f"{time.time():.3f}"}
        identity = domains.claim(building)  # the store seals the directory back to root's
        try:
            agent = domains.boot(
                who, name, uuid, paths, spec, artifacts, metadata, timings, identity
            )
            try:
                with domains.step(who, "warm", timings):
                    answer = agent.execute(templates.WARM_CODE, timeout_s=templates.WARM_TIMEOUT_S)
                if answer.get("status") != protocol.STATUS_OK:
                    error = answer.get("error") or {}
                    raise TemplateError(
                        f"warming the template failed: {answer.get('status')}: "
                        f"{error.get('name', '')} {error.get('value', '')} "
                        f"{answer.get('stderr', '')[-1000:]}"
                    )
                with domains.step(who, "prepare", timings):
                    agent.prepare_snapshot()
            finally:
                agent.close()
            time.sleep(TEMPLATE_SETTLE_S)
            state = building / templates.STATE_FILE
            with domains.step(who, "save", timings):
                domains.libvirt.call(
                    f"save {name}",
                    lambda c: c.lookupByName(name).saveFlags(
                        str(state), None, libvirt.VIR_DOMAIN_SAVE_RUNNING
                    ),
                    retry=False,
                )
            xml = domains.libvirt.call(
                "read the saved XML", lambda c: c.saveImageGetXMLDesc(str(state), 0)
            )
            (building / templates.XML_FILE).write_text(xml)
            self._make_shareable(who, building, (name, uuid), identity, spec, timings)
        except BaseException:
            domains.destroy_domain(name)
            raise
        finally:
            domains.remove_files(name, None)
        return name, uuid
