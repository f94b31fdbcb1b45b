"""The compile driver's stages, each a function with one typed result.

:mod:`graphprune.compile` runs them top to bottom: ``structured`` (capture, analysis, plan
resolution, rewrite with freeze and retry, one-shot refit), ``sparse`` (masks, SparseGPT,
parametrization), then the config sync of :mod:`graphprune.hf`; ``latency`` wraps the whole
compile in measured rounds for latency targets. Stages sit above planning and rewriting (they
use both) and below the public driver; nothing below them imports them.
"""
