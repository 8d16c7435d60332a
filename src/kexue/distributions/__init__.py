"""Probability maps from perturbed argmax (theory and examples: ``docs/guides/distributions.md``).

``p_i = P[argmax_j (mu_j + eps_j) = i]`` for i.i.d. noise ``eps``: softmax for Gumbel noise,
the multinomial probit for normal noise, sparse maps for bounded noise. Evaluated by
quadrature in log space; sampled exactly by ``argmax(mu + eps)``.
"""

from kexue.distributions.distribution import PerturbedArgmax
from kexue.distributions.noise import (
    NOISE_NAMES,
    NoiseFamily,
    custom_noise,
    gumbel,
    laplace,
    logistic,
    noise_family,
    normal,
    uniform,
)
from kexue.distributions.perturbed_argmax import (
    PerturbedArgmaxCrossEntropy,
    perturbed_argmax_cross_entropy,
    perturbed_argmax_log_probs,
    perturbed_argmax_probs,
)
from kexue.distributions.quadrature import RULES, QuadratureRule, quadrature_rule

__all__ = [
    "NOISE_NAMES",
    "RULES",
    "NoiseFamily",
    "PerturbedArgmax",
    "PerturbedArgmaxCrossEntropy",
    "QuadratureRule",
    "custom_noise",
    "gumbel",
    "laplace",
    "logistic",
    "noise_family",
    "normal",
    "perturbed_argmax_cross_entropy",
    "perturbed_argmax_log_probs",
    "perturbed_argmax_probs",
    "quadrature_rule",
    "uniform",
]
