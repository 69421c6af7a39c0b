"""Keeping pools ready and sessions tidy: a host's ready VMs (ready.py, run by the host worker)
and the idle-expiry sweep (expiry.py, run by beat). Stands on the core; never imports api/ or
workers/."""
