# The Shoal services image (api, worker, beat). Guests run under the host's libvirtd.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends \
      gcc pkg-config libvirt-dev libvirt-clients qemu-utils e2fsprogs \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/shoal
COPY pyproject.toml README.md ./
COPY shoal shoal
COPY api api
COPY workers workers
COPY pool pool
COPY vm-images vm-images
RUN pip install --no-cache-dir .
