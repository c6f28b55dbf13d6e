"""Helpers shared by the test files, importable as ``helpers.<module>`` (``tests/`` is on pytest's ``pythonpath``).

- ``tolerances``: the one tolerance table and the one ``assert_close``.
- ``strategies``: hypothesis strategies shared by several test files.
- ``cotraining_inputs``: random logits (in every accepted layout) and hard or soft targets for the co-training loss.
- ``compare``: a grouped op or layer beside its float64 reference (shared backward, per-branch gradients, call counter).
- ``oob``: NaN- and sentinel-filled buffers that show out-of-bounds reads and writes of interpreted kernels.
- ``fake_datasets``: tiny data sets on disk in the real formats (CIFAR archives, an image folder).
- ``train_runs``: a small, fast ``groupnet.train`` run and checkpoint comparisons.
"""
