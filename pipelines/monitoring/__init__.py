"""Production monitoring: the serving log in the lake, its metrics, and the actions they drive."""
