"""The benchmark scripts' shared library: one job per module.

    stats      paired per-repeat ratios, quartiles, the distribution-free CI of the median
    timing     synchronised timing of steps and kernels, the shuffled order of a repeat
    machine    the CPU (model, vector instruction set), threads, torch, the GPU
    models     the benchmark models and their random batch
    variants   the table of step variants (GHLConfig settings and dispatch-policy overrides)
    runners    a variant of a model ready to take SGD steps (eager or in a CUDA graph)
    layers     plastic layers' shapes, the arithmetic floor and the kernel-floor probes
    naive_ghl  GHL the way the paper's demo computes it (the naive baseline)

The scripts in ``bench/`` run as ``python bench/NAME.py``; Python puts ``bench/`` on the
import path for them, so ``import benchlib`` finds this package.
"""
