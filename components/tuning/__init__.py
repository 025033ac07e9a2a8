"""The tuning study's pieces, one module per job; ``flows/tune.py`` wires them into a flow.

study: the search space, sampler, pruner and storage; trials: one trial as a DVC experiment;
fits: which metric and models fit the data; top_k: the ensemble of the best trials; page: the
trials table, plots and reports/tuning.html.
"""
