"""The single controller: job service, specs, scheduler, job store, dashboard."""
