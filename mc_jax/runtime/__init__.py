"""The MegaContext runtime: state.py (configs, `Runtime`, `DecodeState`), kv_sync.py (KV cache
sync with the working context), step.py (the jitted block step and ingest), session.py (the host
`Session` driver), answer.py (a greedy answer after the working context), telemetry.py
(--show-focus, telemetry rows, network timings). Imports neither training nor evaluation."""
