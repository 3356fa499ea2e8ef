"""gRPC channel and server options every role uses."""
MAX_MESSAGE_BYTES = 256 << 20  # prompts carry raw image and video bytes
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# A peer whose host vanished (no RST) is found by HTTP/2 pings, idle or not. A *stopped* process
# is not: its kernel still acks, so the proxy's health rounds decide that (proxy/cluster/router.py).
CLIENT_OPTIONS = GRPC_OPTIONS + [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                                 ("grpc.keepalive_permit_without_calls", 1),
                                 ("grpc.http2.max_pings_without_data", 0)]
# servers accept those pings (by default a ping more often than every 5 min is a strike)
SERVER_OPTIONS = GRPC_OPTIONS + [("grpc.keepalive_permit_without_calls", 1),
                                 ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                                 ("grpc.http2.max_ping_strikes", 0)]
