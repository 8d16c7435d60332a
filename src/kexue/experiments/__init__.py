"""Experiment code shared by the tour and the benchmarks (one home, imported by both).

The tour's sections (``kexue.tour.sections``) and the scripts under ``benchmarks/`` run the
same experiments at different sizes; the experiments live here, and neither the tour nor the
benchmarks import each other. Also the tools both use to report: :mod:`.tables` (result
tables), :mod:`.machine` (what a measurement ran on), :mod:`.timing` (wall-clock medians).
"""
