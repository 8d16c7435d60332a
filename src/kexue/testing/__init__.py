"""Independent references to test kexue against (and models built with it).

Each module here recomputes what a capability computes, by another route: explicit float64
formulas, scipy's adaptive quadrature, brute force, Monte Carlo, or closed forms of a testbed
(the exact eps-model of Gaussian data). Nothing here imports the code it checks.
"""
