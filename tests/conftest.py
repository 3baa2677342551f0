import os

from stages.common.cpu import quiet_threads

quiet_threads()  # idle OpenMP/OpenBLAS threads sleep, as in `cascade serve`

# Keep real-model tests inside the 2-core budget: each model gets at most 2 threads.
os.environ.setdefault("OMP_NUM_THREADS", "2")
