"""The datasets beyond MNIST's IDX files (which utils.py reads): CIFAR-10 (cifar10.py), and the
checked downloads every dataset falls back on (downloads.py)."""
