"""Make this host's domains agree with the VMs the session registry says it should run.

A host only ever looks at domains named with its own prefix (workers/domain.py). Given the ids
of the VMs that should live on this host (those of the sessions the registry places here, and
the host's ready VMs):
- a VM domain whose VM id is not known is a stray: destroyed, its files removed;
- a known VM without a running domain has vanished: reported, for the caller to mark its
  session lost (the Redis side belongs to the caller);
- a VM directory with neither a domain nor a known VM is removed.
- a template domain (key `t...`) exists only while a template is being built: it is left alone
  while some process holds that template's build lock, and destroyed otherwise (its builder
  died before saving it).
VMs this process is creating right now (`busy`) are skipped both ways.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import libvirt

from shoal.settings import Settings
from workers import domain as dom
from workers.libvirt_conn import LibvirtConnection

log = logging.getLogger("shoal.reconcile")


@dataclass
class ReconcileReport:
    destroyed: list[str] = field(default_factory=list)  # domain names of strays
    missing: list[str] = field(default_factory=list)  # known VM ids without a domain
    removed_dirs: list[str] = field(default_factory=list)  # leftover VM directories


def our_domains(settings: Settings, conn: LibvirtConnection) -> dict[str, bool]:
    """{domain name: active} for every domain carrying this host's prefix."""

    def listing(c: libvirt.virConnect) -> dict[str, bool]:
        return {
            d.name(): bool(d.isActive())
            for d in c.listAllDomains(0)
            if dom.key_of(settings, d.name()) is not None
        }

    return conn.call("list domains", listing)


def reconcile(
    settings: Settings,
    conn: LibvirtConnection,
    known_vm_ids: Iterable[str],
    busy_vm_ids: Iterable[str],
    destroy_domain: Callable[[str], None],
    template_in_use: Callable[[str], bool] = lambda key: True,
    remove_partial_template: Callable[[str], None] = lambda key: None,
) -> ReconcileReport:
    report = ReconcileReport()
    known = {dom.vm_key(vm_id): vm_id for vm_id in known_vm_ids}
    busy = {dom.vm_key(vm_id) for vm_id in busy_vm_ids}
    domains = our_domains(settings, conn)
    running: set[str] = set()
    for name, active in sorted(domains.items()):
        key = dom.key_of(settings, name)
        assert key is not None
        if dom.is_template_key(key):
            if not template_in_use(key):
                log.warning("destroying template domain %s: no builder holds its lock", name)
                destroy_domain(name)
                remove_partial_template(key)
                report.destroyed.append(name)
            continue
        if key in busy:
            continue
        if key in known and active:
            running.add(key)
            continue
        # Unknown, or known but defined and not running (we only make transient domains).
        log.warning("destroying stray domain %s", name)
        destroy_domain(name)
        report.destroyed.append(name)
        shutil.rmtree(dom.vm_paths(settings, key).dir, ignore_errors=True)
    for key, vm_id in sorted(known.items(), key=lambda kv: kv[1]):
        if key not in running and key not in busy:
            report.missing.append(vm_id)
    vms = dom.vms_dir(settings)
    if vms.is_dir():
        for directory in sorted(vms.iterdir()):
            key = directory.name
            if key in running or key in busy or key in known:
                continue
            shutil.rmtree(directory, ignore_errors=True)
            report.removed_dirs.append(str(directory))
    return report
