"""Scoring models: the official SNI metrics (metrics) and protocol (sni), response perplexity and the
gate-consistency gap (perplexity), exact match on the task families (families), lm-evaluation-harness
(lm_eval, needs the ``eval`` extra)."""
