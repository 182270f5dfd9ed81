"""Experiments that reproduce the paper's claims with this library.

* :mod:`dsrb.experiments.proportions`: ``python -m dsrb.experiments.proportions`` trains the chosen methods
  (``baseline``, ``dsrb`` and its ablations) over a grid of known-label proportions and seeds, resumably, and
  writes the paper-style table of mAP per proportion with the average, a CSV of every run and a plot.
* :mod:`dsrb.experiments.report`: the tables and the plot, built from the finished runs.
"""
