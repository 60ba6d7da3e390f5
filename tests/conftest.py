import os

# Stable, quick CPU runs on small machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
