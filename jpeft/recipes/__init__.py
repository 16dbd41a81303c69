"""End-to-end jobs built from the public API (the demo's fine-tune lives here)."""
