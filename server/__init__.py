"""The serving process: HTTP API, store, scheduler, engine."""
