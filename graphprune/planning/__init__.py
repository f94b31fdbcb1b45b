"""Planning: a :class:`~graphprune.planning.plan.Plan` and importance scores become kept
channels per pruning unit (``units``, ``resolve``), made consistent with the sizes the forward
computes (``relations``); sparse masks (``masks``) and latency allocations (``latency``).
Planning reads the analysis and the one-shot statistics; it never rewrites a model."""
