"""The recovery-step benchmark (`srel-fast bench recover-step`), one module per responsibility:

- configs.py    provider names, srel-fast's ablations, the benchmark configs;
- device.py     srel-fast's fast path on the device, its AMP dtype, sync (the environment record:
                ../environment.py);
- reference.py  the original SRe2L recovery iteration, re-implemented;
- providers.py  the context and every provider (reference, srel-fast, floor, DM / MTT);
- floor.py      the floor (model forward + input-gradient backward) and its FLOP floor;
- rss.py        the CPU RSS sampler;
- timing.py     warm-up, interleaved timing, statistics, ratios;
- report.py     Markdown table, chart, re-rendering of a saved JSON;
- cli.py        argparse and main (also ``python -m srel_fast.bench.recover_step``).
"""
