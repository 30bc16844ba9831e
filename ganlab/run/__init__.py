"""Training a GAN: the loop (loop.py), the compiled call of K steps it runs (calls.py), stopping it on a
signal or a NaN (stopping.py), its checkpoints (checkpoint.py), the run's directory (directory.py) and
what the user watches as it trains (outputs.py)."""
