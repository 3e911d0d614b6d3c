"""The editing machinery every method shares, below all algorithm packages.

- ``editor``: the editor contract (``Editor``, ``EditOutcome``) and weight bookkeeping;
- ``requests``: edit requests (normalised targets, the roll-back request);
- ``representations``: the fact token, and keys/values of modules there;
- ``value_optimisation``: the v*/z optimisation (ROME's v*, MEMIT's z);
- ``forward``: the forward strategies that optimisation runs (full, suffix, prefix-cached);
- ``context_templates``: seeded prefixes sampled from the model;
- ``corpus`` and ``layer_stats``: second-moment statistics of layer keys, collected in one pass;
- ``covariance``: factorised covariances; ``resources``: what a run's edits share.
"""
