import os

# Tests run on CPU with a small thread budget so the suite fits a 2-core machine.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(config, items):
    """Notebooks first: they are the longest file, and with two workers (``-n 2 --dist loadfile``)
    starting them early keeps one worker from finishing long after the other."""
    items.sort(key=lambda item: "notebook" not in item.keywords)
