"""How good is kdbench's search? Recorded learning-curve tables and searches replayed on them.

A table (``tables/NAME.csv.gz``) holds real ``distill`` runs, recorded by ``kdbench tune`` itself from a grid
study of scrambled-Sobol configurations x seeds (``tables/NAME.toml``): every epoch's validation metrics and
seconds, and the final test values. A replay (:mod:`.simulate`) drives the search's own code on it -- the study's
Optuna sampler through kdbench's searcher, kdbench's ASHA rules -- with W asynchronous workers on a simulated
clock, and :mod:`.score` says what the search reported, measured on seed means (the truth, not the lucky
seed). ``python -m benchmarks.replay --help`` lists the steps; benchmarks/README.md has the findings.
"""
