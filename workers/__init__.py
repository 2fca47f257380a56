"""Island hosts: the Ray actor, its gRPC services and the per-job runtimes.

island_host.py      the island host Ray actor and its group (placement, jax.distributed, spares)
warm_spare.py       a warm spare compiles its host's training jobs ahead (promoted on a death)
host.py             host facts: HostMetadata, devices, memory budget, worker wire version
service.py          WorkerService: the controller's job operations on this host
serving.py          `serve` and BackgroundServer: the host's port (worker, exchange, health)
requests.py         decoding LoadJob into an IslandJobSpec (INVALID_ARGUMENT naming the field)
ordering.py         StepOrder: epochs, island_seq, idempotent RunStep replay
checkpoint.py       orbax checkpoints and the policy (who writes, when, restore)
peer_restore.py     a job's state host to host from a surviving replica (FetchState)
memory.py           device memory diagnostics (compiled and live bytes)
exchange.py         the gradient exchange algorithm between islands (client side, mailbox)
exchange_service.py ExchangeService: the peers' endpoint on the same port
auth.py             the cluster credential: the hosts' check (constant time), peers' metadata
tls.py              the cluster CA, host certificates, TLS where an address wants it
rpc.py              one gRPC server start-up and one error-to-status mapping (both servers)
runtime.py          the JobRuntime interface; runtimes.py picks one per model preset
probe_runtime.py    the linear probe job; palm_runtime.py the PaLM job; sampling.py generation
pipeline.py         PipelineRuntime: one stage of a pipeline job, GPipe or 1F1B per step
stage_link.py       activations and their gradients host to host between neighbouring stages
serve_engine.py     kind: serve: the continuous batching loop over a slot KV cache; IslandGate
serve_rpc.py        StartServe/StopServe/Generate; CutSlice (a job's slices cut at one step)
evaluation.py       the Evaluate rpc's host side: loss, perplexity, exact match, token F1 per source
sim_host.py         simulated island hosts (worker.proto over real gRPC, no JAX) for scale tests
ray_cluster.py, discovery.py   the local Ray cluster and island discovery
"""
