"""The single controller: one process that holds every job and drives every island.

core.py             Controller: wires the roles; life cycle; submit, cancel, update
service.py          ControllerService (gRPC): the servicer and `serve`
jobs.py             JobRunner: one job's load, steps, suspend/resume, recovery, end; Reporter
admission.py        which queued/suspended job starts, resumes or waits (and why); preemption
scheduler.py        memory-aware gang placement and stride-scheduled step slots
dispatch.py         a job's steps on its islands with a bounded window in flight (StepGate);
                    its slices cut at one step for serving
islands.py          the island handle: every worker RPC, host fan-out, restart via Ray
program.py          StepProgram and HostLoad: what a host loads and runs
resolved.py         ResolvedJob (a spec resolved once), the one LoadJobRequest builder, and
                    MemoryFigures (what jobs measured they hold, by model, mesh and batch)
recovery.py         failure classes, retry budgets, checkpoint registry and rollback
peer_recovery.py    a data-parallel job resumed from its surviving islands (no step lost)
pipeline.py         pipeline jobs: stage-major islands, a stage's load, per-stage memory, layout
trace.py            a job's hosts' execution logs (the Trace rpc) and the pipeline Gantt data
sampling.py         SampleJob: text from a running job or an ended job's checkpoint
serve_router.py     kind: serve jobs' replicas, the Generate stream (least-loaded replica);
                    ServeArbiter: training cut and held off while an island serves
mixture_weights.py  a mixture job's per-source weights (dynamic: from global losses), per step
evaluation.py       a job's evaluation: the Evaluate rpc on its first island, stored per source
lineage.py          job chains: `after` and `init_from` resolved at submit, what a queued job
                    waits for, the checkpoint a fine-tuning or eval job starts from
views.py            the one job view, islands view, StepMetrics builder, `why`
bus.py              the in-memory event bus (WatchJob, dashboard) and the job logs (persisted)
spec.py             job spec validation (every semantic check); re-exports the two below
spec_configs.py     a spec -> the model's configs, the scheduling fields' defaults
spec_errors.py      SpecError and the quoting of values in its messages
data_paths.py       a job's data paths checked at submit on the controller's view of storage
states.py           job states and the errors the client shares (no heavy imports)
store.py, store_progress.py, schema.py, statedir.py   SQLite store, migrations, state-dir lock
wire.py, options.py the controller's wire version; its flags and ports (no side effects)
auth.py             the access token (gRPC interceptor, file) and the hosts' cluster secret file
dashboard.py, dashboard_auth.py, dashboard_stream.py, prometheus.py   the web dashboard
__main__.py         `python -m pathways_lite.controller`: start islands, serve (`--standby`: wait
                    on the state dir's lock, everything imported, and take over)
standby.py          `--keep-standby`: a serving controller spawns, records, replaces and stops
                    its own standby (`<state_dir>/standby.pid`)
"""
