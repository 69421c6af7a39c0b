from __future__ import annotations

import pytest

from shoal.settings import load


def test_defaults_work_on_one_machine() -> None:
    s = load({})
    assert s.port == 8080 and s.tls_port == 8443
    assert s.cache == "/var/cache/shoal" and s.vm_dir == "/var/lib/shoal"
    assert s.home.endswith(".shoal")


def test_environment_overrides_and_bad_numbers_name_the_variable() -> None:
    assert load({"SHOAL_PORT": "9000"}).port == 9000
    with pytest.raises(SystemExit, match="SHOAL_PORT"):
        load({"SHOAL_PORT": "eighty"})


def test_instance_id_follows_home() -> None:
    assert load({"SHOAL_HOME": "/a"}).instance_id != load({"SHOAL_HOME": "/b"}).instance_id
