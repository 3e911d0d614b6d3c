"""The editing machinery every method shares, below all algorithm packages.

- ``editor``: the editor contract (``Editor``, ``EditOutcome``) and weight bookkeeping;
- ``requests``: edit requests (normalised targets, the roll-back request);
- ``representations``: the fact token, and keys/values of modules there;
- ``value_optimisation``: the v*/z optimisation (ROME's v*, MEMIT's z);
- ``forward``: the forward strategies that optimisation runs (full, suffix, prefix-cached);
- ``context_templates``: seeded prefixes sampled from the model;
- ``corpus`` and ``corpus_sample``: the texts of the statistics, drawn as ROME draws them;
- ``layer_stats`` (with ``stats_plan``, ``stats_collection``, ``stats_moments``, ``stats_cache``,
  ``stats_checkpoint``, ``stats_distributed``): second-moment statistics of layer keys, collected in
  one pass for every layer, in token-budget batches, resumable, and sharded over processes;
- ``covariance``: factorised covariances; ``resources``: what a run's edits share.
"""
