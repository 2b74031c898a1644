"""`python -m dap_ray.tune`: a Ray Tune sweep over DAP's knobs (see dap_ray.tune.sweep for the CLI).

One module per part: `space` (tune.space -> Dims, checks), `trial` (what one trial does and what all
trials share), `results` (table and plots), `best` (final test, best_overrides.txt, best_config.yaml)
and `sweep` (the driver: validate -> banks -> Tuner -> results).
"""
