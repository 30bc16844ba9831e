"""The datasets beyond MNIST's IDX files (which utils.py reads): CIFAR-10 (cifar10.py), a folder of
your own pictures (folder.py), and the checked downloads the named datasets fall back on (downloads.py)."""
