import os

os.environ.setdefault("WANDB_MODE", "disabled")
# pytest runs two workers on two cores (pyproject's addopts): a torch process per worker that used both cores would
# oversubscribe them (5-10x slower). One thread each; the runs the tests start inherit it. The tests that check
# threading set their thread counts themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")
