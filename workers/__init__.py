"""Island hosts: the Ray actor, its gRPC worker service and the per-job runtime."""
