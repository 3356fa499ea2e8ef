"""The flags serve, Helm and the docs start `qwenvl-pd encode` with."""
from qwenvl_pd.cli import build_parser


def test_encode_flags_and_defaults():
    args = build_parser().parse_args(["encode", "M"])
    assert (args.model_arg, args.port, args.host, args.bind, args.device, args.dtype) == \
        ("M", 50053, "127.0.0.1", "0.0.0.0", "auto", "auto")
    assert (args.embedding_cache_gib, args.embedding_store, args.lease_seconds, args.max_encode_batch_tokens,
            args.limit_images, args.limit_videos, args.transfer_protocol) == (1.0, "", 30.0, 16384, 16, 2, "tcp")


def test_encode_flags_as_serve_passes_them():
    args = build_parser().parse_args([
        "encode", "--model", "M", "--port", "7", "--host", "127.0.0.1", "--cpus", "0-1",
        "--embedding-store", "127.0.0.1:9", "--embedding-cache-gib", "0.5", "--lease-seconds", "5",
        "--max-encode-batch-tokens", "99", "--transfer-device", "mlx5_0", "--instance-id", "e0",
        "--cluster-secret-file", "/s", "--threads", "2", "--drain-seconds", "3"])
    assert (args.model, args.port, args.cpus, args.embedding_store, args.embedding_cache_gib) == \
        ("M", 7, (0, 1), "127.0.0.1:9", 0.5)
    assert (args.lease_seconds, args.max_encode_batch_tokens, args.transfer_device, args.instance_id,
            args.cluster_secret_file, args.threads, args.drain_seconds) == (5.0, 99, "mlx5_0", "e0", "/s", 2, 3.0)
