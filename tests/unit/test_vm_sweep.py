"""The host's periodic sweep: domains and VM directories nobody owns go, owned ones stay, and a
VM being created is never taken for a stray (faults: a libvirtd restart, a restore cut off)."""

from __future__ import annotations

from pathlib import Path

from shoal.settings import Settings
from workers import domain as dom
from workers import vm as vm_module
from workers.vm import VMManager


def test_the_sweep_removes_only_what_nobody_owns(tmp_path: Path, monkeypatch) -> None:
    settings = Settings(home=str(tmp_path / "home"), vm_dir=str(tmp_path / "vms"), host_name="h1")
    manager = VMManager(settings)
    ids = ("vm_owned", "vm_stray", "vm_new", "vm_gone", "vm_h2", "vm_h1_gone")
    key = {vm_id: dom.vm_key(vm_id) for vm_id in ids}
    name = {vm_id: dom.domain_name(settings, k) for vm_id, k in key.items()}
    running = [name["vm_owned"], name["vm_stray"], name["vm_new"]]
    monkeypatch.setattr(vm_module, "our_domains", lambda s, c: dict.fromkeys(running, True))
    torn: list[str] = []
    monkeypatch.setattr(manager.domains, "teardown", lambda n, paths: torn.append(n))
    for vm_id in ("vm_owned", "vm_gone", "vm_new", "vm_h2", "vm_h1_gone"):
        (dom.vms_dir(settings) / key[vm_id]).mkdir(parents=True)
    # Another host worker of this instance on this machine shares vms/: its VMs are its own.
    dom.vm_paths(settings, key["vm_h2"]).host_marker.write_text("h2")
    dom.vm_paths(settings, key["vm_h1_gone"]).host_marker.write_text("h1")
    manager._busy.add("vm_new")  # being created right now

    assert manager.sweep(lambda: {"vm_owned"}) == [name["vm_stray"]]
    assert torn == [name["vm_stray"]]
    left = {p.name for p in dom.vms_dir(settings).iterdir()}
    # vm_gone's and vm_h1_gone's directories had no owner; vm_h2's is the other host's.
    assert left == {key["vm_owned"], key["vm_new"], key["vm_h2"]}
