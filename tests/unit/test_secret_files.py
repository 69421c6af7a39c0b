import os
import stat

from shoal.secret_files import read_secret, write_secret


def test_secret_is_created_0600_and_replaced_atomically(tmp_path):
    path = tmp_path / "sub" / "key"
    old_umask = os.umask(0)
    try:
        write_secret(path, "first\n")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        write_secret(path, b"second\n")
    finally:
        os.umask(old_umask)
    assert read_secret(path) == "second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["key"]
