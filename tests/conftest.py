"""Shared test configuration: Hypothesis profiles.

The default profile is reproducible (``derandomize=True``) so CI runs are deterministic; run
``pytest --hypothesis-profile=explore`` to search with fresh random seeds.
"""

from hypothesis import settings

settings.register_profile("default", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("explore", deadline=None, derandomize=False, print_blob=True)
settings.load_profile("default")
