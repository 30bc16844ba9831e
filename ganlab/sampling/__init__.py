"""Using a trained generator: samples, grids and interpolations (sample.py), and scoring them against
the real data (evaluation.py)."""
