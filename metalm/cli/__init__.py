"""Console entry points that are more than one module's `main`: `metalm-train` (metalm.cli.train)."""
