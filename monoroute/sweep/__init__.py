"""`monoroute sweep SPEC`: train, evaluate and analyse a family of runs, then tabulate and plot them.

    spec.py     the spec file: base preset + named runs of overrides, every config built and checked
    plan.py     what each run needs (train / resume / skip), checked against data, devices and run dirs
    execute.py  the loop: train through trainer.train, evaluate, analyse, record after every run
    results.py  sweep.json / sweep.csv / the text table, from the per-run records
    plots.py    loss vs FLOPs/token and coverage vs loss (PNG)
    cli.py      the subcommand
"""
