"""Context policies of the evaluation sweeps: protocol.py (the interface and its exceptions),
window.py (base-only), megacontext.py and oracle.py (over the runtime), registry.py (by name)."""
