"""What prefill and decode instances share around the engine: the runtime (model stack, KV
region registered with Mooncake), the gRPC host, and the colocated backend."""
