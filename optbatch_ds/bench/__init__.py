"""Benchmarks and run analysis (never imported by the core package).

    plan.py             which runs a grid holds, validated and estimated
    grid.py             launch/bench.py: run the plan through the real launcher, then report
    report.py           collect run directories -> tables (paired by seed) -> plots
    analyze_run.py      launch/analyze_run.py: what a run's selection did, epoch by epoch
    epoch.py            launch/bench_epoch.py: the cost of an epoch against DESIGN §3's model
    selector_timing.py  launch/bench_selector.py: step 4 alone on synthetic inputs
    io.py               reading and writing their files
"""
