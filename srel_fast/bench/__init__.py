"""The benchmark suite, shipped as srel_fast.bench (pyproject maps it here): `srel-fast bench ...`.

- recover_step/   one recovery iteration against the reference, DM, MTT and the floor;
- baselines.py    DM and MTT updates for that benchmark;
- bench_<op>.py   one pytest-benchmark file per kernel op (bench_bn_stat_loss, bench_fused_bn_stat,
                  bench_multicrop_resize);
- bench_loader.py the data loaders; kernel_check.py the float64 kernel check of gpu_check.sh;
- cli.py          the `srel-fast bench` dispatcher.

Results and notes (results/, NOTES.md) stay in the source checkout.
"""
