"""Every knob Shoal has, with a default that works on one machine and a SHOAL_* variable.

Settings are read once per process from the environment (`load()`); nothing else in the code
reads `os.environ` for configuration. The table in README.md is generated from `FIELDS` below
(`shoal settings`), so the docs and the code cannot drift apart.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Worker threads beyond one per VM (Settings.worker_threads).
WORKER_SPARE_THREADS = 16
# The default maxmemory is 1/8 of RAM, at most this (Settings.redis_maxmemory_bytes).
DEFAULT_REDIS_MAXMEMORY_CAP = 4 << 30


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _default_home() -> str:
    return str(REPO_ROOT / ".shoal")


@dataclass(frozen=True)
class Settings:
    # --- where things live -------------------------------------------------------------------
    home: str = field(
        default_factory=_default_home, metadata={"doc": "pid files, logs, dev and admin keys"}
    )
    cache: str = field(default="/var/cache/shoal", metadata={"doc": "built guest images"})
    vm_dir: str = field(
        default="/var/lib/shoal", metadata={"doc": "overlays, sockets, console logs, templates"}
    )
    pools_file: str = field(default="", metadata={"doc": "pools TOML (default: pools.toml)"})
    # --- network endpoints -------------------------------------------------------------------
    bind: str = field(default="127.0.0.1", metadata={"doc": "address the API listens on"})
    port: int = field(default=8080, metadata={"doc": "HTTP port"})
    tls_port: int = field(default=8443, metadata={"doc": "HTTPS port (0 disables)"})
    tls_cert: str = field(default="", metadata={"doc": "PEM certificate (default: self-signed)"})
    tls_key: str = field(default="", metadata={"doc": "PEM key for SHOAL_TLS_CERT"})
    redis_url: str = field(
        default="",
        metadata={
            "doc": "Redis URL: redis://, rediss:// (TLS) or sentinel:// (docs/deployment.md); "
            "unset: a private one with a generated password"
        },
    )
    redis_ca_file: str = field(
        default="", metadata={"doc": "CA bundle that signs a rediss:// Redis's certificate"}
    )
    redis_retry_s: float = field(
        default=30.0,
        metadata={"doc": "how long clients of a sentinel:// Redis retry while a failover runs"},
    )
    api_workers: int = field(default=2, metadata={"doc": "WSGI worker processes"})
    api_threads: int = field(default=16, metadata={"doc": "threads per WSGI worker"})
    # --- identity ----------------------------------------------------------------------------
    instance: str = field(default="", metadata={"doc": "instance id (default: hash of home)"})
    host_name: str = field(
        default_factory=socket.gethostname, metadata={"doc": "this worker's host name"}
    )
    # --- guests ------------------------------------------------------------------------------
    accel: str = field(default="auto", metadata={"doc": "auto, kvm or tcg"})
    require_kvm: int = field(
        default=0,
        metadata={"doc": "1: the worker (and `shoal up`) refuses to start unless KVM is usable"},
    )
    debian_mirror: str = field(default="", metadata={"doc": "mirror for debootstrap"})
    default_image: str = field(default="python", metadata={"doc": "image of the default pool"})
    vcpus: int = field(default=1, metadata={"doc": "vCPUs of the default pool"})
    memory_mib: int = field(default=512, metadata={"doc": "memory of the default pool"})
    data_disk_mib: int = field(default=1024, metadata={"doc": "/mnt/data size"})
    tmp_mib: int = field(default=256, metadata={"doc": "/tmp size in the guest"})
    tb_cache_mib: int = field(default=64, metadata={"doc": "TCG translation cache per VM"})
    # --- per-VM identity and limits on the host (docs/security.md, docs/limits.md) ---------
    vm_uid_base: int = field(
        default=900000, metadata={"doc": "first uid (and gid) of the per-VM range"}
    )
    vm_uid_count: int = field(
        default=10000, metadata={"doc": "uids in the per-VM range: live VMs a host may hold"}
    )
    memory_sharing: str = field(
        default="auto",
        metadata={
            "doc": "auto: clones map their template's memory copy-on-write when the host can "
            "(docs/performance.md); off: every clone reads the whole snapshot"
        },
    )
    vm_cpu_cap: float = field(
        default=0.0,
        metadata={"doc": "cores one VM's QEMU may use, when its spec sets none (0: its vCPUs)"},
    )
    vm_memory_overhead_mib: int = field(
        default=256,
        metadata={"doc": "QEMU's memory cgroup limit: guest memory + TCG cache + this"},
    )
    vm_pids_max: int = field(
        default=256, metadata={"doc": "threads one VM's QEMU may have (pids cgroup)"}
    )
    vm_disk_bytes_per_s: int = field(
        default=100 << 20, metadata={"doc": "data disk I/O per VM, bytes/s (0: no cap)"}
    )
    vm_disk_iops: int = field(
        default=2000, metadata={"doc": "data disk I/O per VM, operations/s (0: no cap)"}
    )
    agent_ready_timeout_s: float = field(
        default=120.0, metadata={"doc": "boot or restore to agent ready"}
    )
    interrupt_grace_s: float = field(
        default=5.0, metadata={"doc": "wait after an interrupt before killing"}
    )
    # --- sessions and executions -------------------------------------------------------------
    max_timeout_s: int = field(default=220, metadata={"doc": "longest execution allowed"})
    default_timeout_s: int = field(default=60, metadata={"doc": "execution timeout default"})
    max_output_cap: int = field(
        default=1 << 20, metadata={"doc": "hard cap on max_output (characters)"}
    )
    max_rich_output_bytes: int = field(
        default=4 << 20,
        metadata={"doc": "result + displayed outputs of one execution (at most 16 MiB)"},
    )
    max_upload_bytes: int = field(default=128 << 20, metadata={"doc": "largest file upload"})
    max_json_body_bytes: int = field(
        default=4 << 20,
        metadata={"doc": "largest JSON body; raised to fit 1 MiB of code JSON-escaped (6.06 MiB)"},
    )
    max_batch_body_bytes: int = field(
        default=16 << 20, metadata={"doc": "largest `POST /v1/batches` body"}
    )
    execution_ttl_s: int = field(default=86400, metadata={"doc": "how long records are kept"})
    cooldown_s: int = field(default=300, metadata={"doc": "idle timeout of the default pool"})
    heartbeat_s: float = field(default=3.0, metadata={"doc": "worker heartbeat period"})
    heartbeat_ttl_s: float = field(
        default=15.0, metadata={"doc": "a host is down after this long silent"}
    )
    host_max_vms: int = field(default=48, metadata={"doc": "VMs one host may run"})
    host_memory_reserve_mib: int = field(
        default=2048,
        metadata={
            "doc": "memory a host keeps free: a new VM starts only while the host's available "
            "memory stays above this by the VM's size; ready VMs above target are let go below it"
        },
    )
    restore_parallel: int = field(
        default=2, metadata={"doc": "ready-VM restores a host runs at once"}
    )
    worker_concurrency: int = field(
        default=0, metadata={"doc": "worker threads per host (0: SHOAL_HOST_MAX_VMS + 16)"}
    )
    # --- fair share per tenant (docs/limits.md; `shoal keys limits` sets a tenant's own) -------
    tenant_max_sessions: int = field(
        default=24,
        metadata={"doc": "live sessions per tenant; never above half of SHOAL_HOST_MAX_VMS"},
    )
    host_max_sleep_mib: int = field(
        default=100 << 10,
        metadata={
            "doc": "disk all sleeping sessions of a host may hold (MiB); past it a session "
            "that would fall asleep ends instead (0: no cap)"
        },
    )
    tenant_max_sleep_mib: int = field(
        default=20 << 10,
        metadata={
            "doc": "disk a tenant's sleeping sessions may hold (MiB); past it its oldest "
            "sleeping sessions end first (0: no cap)"
        },
    )
    tenant_rate: float = field(
        default=50.0, metadata={"doc": "requests per second per tenant (token bucket refill)"}
    )
    tenant_burst: int = field(
        default=100, metadata={"doc": "requests a tenant may send at once (token bucket size)"}
    )
    tenant_max_waits: int = field(
        default=8,
        metadata={
            "doc": "requests per tenant waiting for an execution at once; never above a "
            "quarter of the API's threads"
        },
    )
    session_max_pending: int = field(
        default=16, metadata={"doc": "unfinished executions per session"}
    )
    tenant_max_pending: int = field(
        default=64, metadata={"doc": "unfinished executions per tenant, across its sessions"}
    )
    # --- Redis memory (docs/limits.md, "Storage") ---------------------------------------------
    redis_maxmemory_mib: int = field(
        default=0,
        metadata={
            "doc": "maxmemory of the private Redis, or SHOAL_REDIS_URL's as configured there "
            "(0: 1/8 of RAM, at most 4096)"
        },
    )
    redis_tenants_pct: int = field(
        default=80,
        metadata={"doc": "share of maxmemory all tenants' data may hold; the rest is headroom"},
    )
    tenant_max_redis_mib: int = field(
        default=256,
        metadata={
            "doc": "records, outputs and batch results a tenant may hold in Redis; never above "
            "half of the tenants' share"
        },
    )
    # --- webhooks and batches (docs/async.md) --------------------------------------------------
    secret_key: str = field(
        default="", metadata={"doc": "Fernet key sealing webhook secrets (default: SHOAL_HOME)"}
    )
    webhook_allow_hosts: str = field(
        default="", metadata={"doc": "callback hosts exempt from the SSRF check (comma-separated)"}
    )
    webhook_timeout_s: float = field(
        default=10.0,
        metadata={"doc": "a whole delivery attempt: DNS, connect, send, status and headers"},
    )
    webhook_retry_first_s: float = field(
        default=5.0, metadata={"doc": "first retry delay; doubles each time, with jitter"}
    )
    webhook_retry_max_s: float = field(default=600.0, metadata={"doc": "longest retry delay"})
    webhook_retry_window_s: float = field(
        default=3600.0, metadata={"doc": "no retry starts later than this after the first try"}
    )
    webhook_concurrency: int = field(default=8, metadata={"doc": "webhook delivery threads"})
    webhook_tenant_in_flight: int = field(
        default=2,
        metadata={"doc": "one tenant's delivery attempts at once (below the delivery threads)"},
    )
    batch_concurrency: int = field(default=4, metadata={"doc": "batches run at once"})
    batch_tenant_running: int = field(
        default=2, metadata={"doc": "one tenant's batches run at once (below the coordinators)"}
    )
    batch_session_wait_s: float = field(
        default=300.0,
        metadata={"doc": "a batch item's wait for a session while none of the tenant's ends"},
    )
    tenant_max_batches: int = field(
        default=10, metadata={"doc": "unfinished batches per tenant (429 beyond)"}
    )

    def __post_init__(self) -> None:
        # No tenant's default share may take most of a host (or of the API's threads): the
        # defaults are clamped, so changing SHOAL_HOST_MAX_VMS or the API's size moves them too.
        # A tenant's own limits (`shoal keys`) are not clamped.
        for name in POSITIVE:
            if not getattr(self, name) > 0:
                raise SystemExit(f"{env_name(name)} must be above 0")
        if self.redis_maxmemory_mib < 0:
            raise SystemExit(f"{env_name('redis_maxmemory_mib')} must be 0 (the default) or above")
        if self.vm_uid_base < 1000 or self.vm_uid_base + self.vm_uid_count > 2**32 - 2:
            raise SystemExit(
                f"{env_name('vm_uid_base')} must be at least 1000, and the range must end "
                "below 4294967294"
            )
        if self.vm_cpu_cap < 0 or self.vm_memory_overhead_mib < 0:
            raise SystemExit(
                f"{env_name('vm_cpu_cap')} and {env_name('vm_memory_overhead_mib')} must be 0 "
                "or above"
            )
        if self.vm_disk_bytes_per_s < 0 or self.vm_disk_iops < 0:
            raise SystemExit(
                f"{env_name('vm_disk_bytes_per_s')} and {env_name('vm_disk_iops')} must be 0 "
                "(no cap) or above"
            )
        if self.host_memory_reserve_mib < 0:
            raise SystemExit(f"{env_name('host_memory_reserve_mib')} must be 0 or above")
        if self.memory_sharing not in ("auto", "off"):
            raise SystemExit(f"{env_name('memory_sharing')} must be auto or off")
        if not 1 <= self.redis_tenants_pct <= 95:
            raise SystemExit(f"{env_name('redis_tenants_pct')} must be between 1 and 95")
        api_threads = self.api_workers * self.api_threads
        tenants_mib = self.tenants_redis_bytes >> 20
        clamped = {
            "tenant_max_sessions": min(self.tenant_max_sessions, max(self.host_max_vms // 2, 1)),
            "tenant_max_waits": min(self.tenant_max_waits, max(api_threads // 4, 1)),
            "tenant_max_redis_mib": min(self.tenant_max_redis_mib, max(tenants_mib // 2, 1)),
        }
        for name, value in clamped.items():
            object.__setattr__(self, name, value)

    @property
    def worker_threads(self) -> int:
        """A running execution takes a worker thread (waiting ones take none), and a host runs
        at most one per session: with a thread per VM and some to spare, creates, file
        operations, destroys and cancels always find a free thread."""
        return self.worker_concurrency or self.host_max_vms + WORKER_SPARE_THREADS

    @property
    def redis_maxmemory_bytes(self) -> int:
        """The Redis's maxmemory: SHOAL_REDIS_MAXMEMORY_MIB, else 1/8 of this machine's RAM, at
        most 4 GiB (Redis shares the host with the guests, which need the rest)."""
        if self.redis_maxmemory_mib:
            return self.redis_maxmemory_mib << 20
        return min(physical_memory_bytes() // 8, DEFAULT_REDIS_MAXMEMORY_CAP)

    @property
    def tenants_redis_bytes(self) -> int:
        """What all tenants' data together may hold in Redis (shoal/storage.py): the rest of
        maxmemory is headroom for heartbeats, the session registry, queues and transfers."""
        return self.redis_maxmemory_bytes * self.redis_tenants_pct // 100

    @property
    def instance_id(self) -> str:
        """Short id carried by every VM name, so two instances on a host never touch each other."""
        if self.instance:
            return self.instance
        return hashlib.sha256(os.path.realpath(self.home).encode()).hexdigest()[:8]

    @property
    def logs_dir(self) -> Path:
        return Path(self.home) / "logs"

    @property
    def run_dir(self) -> Path:
        return Path(self.home) / "run"

    @property
    def instance_vm_dir(self) -> Path:
        """This instance's VM runtime files: overlays, sockets, console logs, templates."""
        return Path(self.vm_dir) / self.instance_id

    @property
    def pools_path(self) -> Path:
        return Path(self.pools_file) if self.pools_file else REPO_ROOT / "pools.toml"


FIELDS = fields(Settings)
# Limits that 0 would turn into "nothing at all" (or a division by zero): refused at load.
POSITIVE = (
    "tenant_max_sessions",
    "tenant_rate",
    "tenant_burst",
    "tenant_max_waits",
    "session_max_pending",
    "tenant_max_pending",
    "tenant_max_redis_mib",
    "vm_uid_count",
    "vm_pids_max",
)


def env_name(name: str) -> str:
    return "SHOAL_" + name.upper()


def _convert(raw: str, kind: type) -> object:
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    return raw


def load(environ: dict[str, str] | None = None) -> Settings:
    """Build settings from SHOAL_* variables; a malformed number is an error naming the variable."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    types = {"int": int, "float": float, "str": str}
    for f in FIELDS:
        raw = environ.get(env_name(f.name))
        if raw is None or raw == "":
            continue
        kind = types[f.type] if isinstance(f.type, str) else f.type
        try:
            values[f.name] = _convert(raw, kind)
        except ValueError:
            raise SystemExit(f"{env_name(f.name)}={raw!r} is not a valid {kind.__name__}") from None
    return Settings(**values)
