"""Latency-targeted planning: tables of per-op latency (measured by a backend) and the
allocation of kept counts that meets a predicted budget."""
