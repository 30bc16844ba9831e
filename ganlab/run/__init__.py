"""Training a GAN: the loop (loop.py), its checkpoints (checkpoint.py), the run's directory
(directory.py) and what the user watches as it trains (outputs.py)."""
