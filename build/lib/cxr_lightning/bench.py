"""Throughput benchmark: ``python -m cxr_lightning.bench [bench.quick=true] [key=value ...]``
(:func:`cxr_lightning.tasks.bench.run_bench`)."""
from cxr_lightning.cli import bench_main

if __name__ == "__main__":
    bench_main()
