"""Framework-free core, one folder per layer (ARCHITECTURE.md): runtime/ and algorithms/, tasks/, checkpoints/,
models/, training/; pipeline.py and sweep.py drive a run."""
