"""The processes behind the queue: each host's worker (the VMs and their agents), the webhook
and batch workers, and beat. They stand on the core (shoal/) and pool/; never on api/."""
