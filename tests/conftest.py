import os

# Tests run on CPU with a small thread budget so the suite fits a 2-core machine.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
