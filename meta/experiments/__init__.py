"""Many runs at once: paper tables (:mod:`~meta.experiments.tables`, the specs and the table they give;
:mod:`~meta.experiments.reproduce`, the runner behind ``meta-reproduce``) and command-line sweeps
(:mod:`~meta.experiments.sweep`, ``seed=0,1,2``). Each run is one :func:`meta.train`."""
