# Sourced by scripts/up and scripts/test: install what Shoal needs on a Debian 12 machine.
# Idempotent and quiet when everything is already there.

SHOAL_APT_PACKAGES=(
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
  redis-server redis-sentinel debootstrap e2fsprogs busybox-static cpio kmod zstd openssl
  ca-certificates
  python3 python3-venv python3-dev gcc procps util-linux curl
)

shoal_need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
      exec sudo -E "$0" "$@"
    fi
    echo "shoal: run as root (or install sudo): QEMU, libvirt and the image build need it" >&2
    exit 1
  fi
}

shoal_install_system() {
  local missing=() pkg
  for pkg in "${SHOAL_APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "shoal: not a Debian-like system; install these yourself: ${missing[*]}" >&2
    exit 1
  fi
  echo "shoal: installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

shoal_python() {
  # Python >= 3.11: the first python3 on PATH if it is new enough, else Debian's.
  local candidate
  for candidate in python3 /usr/bin/python3; do
    if "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "shoal: Python >= 3.11 with venv is required" >&2
  exit 1
}

shoal_install_venv() {
  local stamp=.venv/.shoal-installed want
  want=$(cat pyproject.toml clients/python/pyproject.toml | sha256sum | cut -c1-16)
  if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  echo "shoal: installing Shoal into .venv"
  [ -x .venv/bin/python ] || "$(shoal_python)" -m venv .venv
  mkdir -p .shoal/logs
  # The client SDK (clients/python, its own package) too: the tests drive a live Shoal with it.
  if ! { .venv/bin/pip install --upgrade pip && .venv/bin/pip install -e '.[test]' \
      && .venv/bin/pip install -e clients/python; } \
      >.shoal/logs/install.log 2>&1; then
    echo "shoal: installing the Python packages failed; the end of .shoal/logs/install.log:" >&2
    tail -n 30 .shoal/logs/install.log >&2
    exit 1
  fi
  echo "$want" >"$stamp"
}

shoal_install() {
  shoal_install_system
  shoal_install_venv
}
