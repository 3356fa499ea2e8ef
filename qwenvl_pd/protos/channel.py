"""gRPC channel and server options every role uses."""
MAX_MESSAGE_BYTES = 256 << 20  # prompts carry raw image and video bytes
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
