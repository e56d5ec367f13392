"""The data plane in front of the model servers: Envoy's bootstrap, its local processes, the
traffic split it reads, and the evidence it writes."""
