"""Models and vectors: BLIP-2 loading, encoders and scoring. Knows nothing of files, HTTP or the CLI."""
