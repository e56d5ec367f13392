"""Batch scoring of landing partitions with a model version's exported artifact."""
