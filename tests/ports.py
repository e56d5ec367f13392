"""Settings that put every local server of a test on a free port, so tests never collide with
each other or with a running demo."""

FREE_PORTS = {
    f"MLOPS__{name}": "0"
    for name in (
        "SERVING__REST_PORT",
        "SERVING__GRPC_PORT",
        "DATAPLANE__PORT",
        "DATAPLANE__ADMIN_PORT",
        "DATAPLANE__SHADOW_PORT",
    )
}
