"""Where and how fast a step runs: the tf.distribute strategy (distribute.py), and precision, XLA and
steps per compiled call (speed.py)."""
