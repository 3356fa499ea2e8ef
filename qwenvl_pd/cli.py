"""`qwenvl-pd <command>`: argparse -> frozen configs -> the command's main()."""
import argparse
import os
import sys

from qwenvl_pd.vllm_cli import (DTYPES, add_accepted_args, add_data_parallel_args, add_engine_args,
                                add_model_arg, data_parallel_instances, engine_flags, log_no_effect, normalize_argv,
                                resolve_model)


def _make_tiny(args: argparse.Namespace) -> int:
    from qwenvl_pd.model.tiny import make_tiny
    path = make_tiny(args.arch, args.out, seed=args.seed, quantize=args.quantize, dtype=args.dtype)
    kind = "" if args.quantize == "none" else f" {args.quantize.upper()}"
    print(f"wrote a tiny{kind} {args.arch} checkpoint with RANDOM weights to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from qwenvl_pd import LLM, SamplingParams
    from PIL import Image
    llm = LLM(model=args.model, max_model_len=args.max_model_len,
              tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
              quantization=args.quantization)
    images = [Image.open(p) for p in args.image]
    pads = "<|vision_start|><|image_pad|><|vision_end|>" * len(images)
    prompt = f"<|im_start|>user\n{pads}{args.prompt}<|im_end|>\n<|im_start|>assistant\n"
    request = {"prompt": prompt, "multi_modal_data": {"image": images} if images else {}}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    print(llm.generate([request], params)[0].outputs[0].text)
    return 0


def _cpus_arg(spec: str) -> tuple[int, ...]:
    from qwenvl_pd.cpus import parse_cpus
    try:
        return parse_cpus(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_cpus_arg(p, what: str, flag: str = "--cpus") -> None:
    p.add_argument(flag, type=_cpus_arg, default=(), metavar="LIST",
                   help=f"pin {what} to these cores, as taskset -c LIST (e.g. 0, 0-1, 0,2-3); "
                   "torch threads default to their count")


def _set_threads(threads: int) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)  # several roles on one host must not oversubscribe


def _node(args: argparse.Namespace) -> int:
    import logging
    from qwenvl_pd.cpus import pin, threads_for
    from qwenvl_pd.protos.auth import read_secret
    from qwenvl_pd.engine.engine_config import EngineConfig
    from qwenvl_pd.engine.stack import StackConfig
    from qwenvl_pd.node.runtime import NodeConfig
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = EngineConfig(
        finish_after_prefill=args.command == "prefill", recompute_on_preempt=args.command != "decode",
        block_size=args.block_size, kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
        num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, step_fill_tokens=args.step_fill_tokens,
        enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
        max_model_len=args.max_model_len, decode_graphs=args.decode_graphs,
        gpu_memory_utilization=args.gpu_memory_utilization)
    log_no_effect(args)
    stack = StackConfig(
        model=args.model, max_model_len=args.max_model_len, device=args.device, dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
        threads=threads_for(args.cpus, args.threads, args.tensor_parallel_size),
        limit_mm_per_prompt={"image": args.limit_images, "video": args.limit_videos}, engine=engine,
        quantization=args.quantization, vision=args.command != "decode")
    cfg = NodeConfig(
        # the served name defaults to the model argument as given, as vLLM's does
        role=args.command, port=args.port, stack=stack, host=args.host, bind=args.bind,
        served_model_name=args.served_model_name or args.model, transfer_protocol=args.transfer_protocol,
        transfer_device=args.transfer_device, transfer_timeout_s=args.transfer_timeout,
        lease_seconds=args.lease_seconds, drain_seconds=args.drain_seconds, instance_id=args.instance_id or "",
        cluster_secret=read_secret(args.cluster_secret_file or ""), max_queued_requests=args.max_queued_requests,
        kv_layer_group=args.kv_layer_group, cpus=args.cpus,
        embedding_read_buffer_mib=args.embedding_read_buffer_mib, embedding_store=args.embedding_store or "",
        allowed_prefills=_hosts(args.allowed_prefills), allowed_encoders=_hosts(args.allowed_encoders))
    pin(cfg.cpus)  # before the ranks start: they inherit it
    _set_threads(stack.threads)
    if args.command == "prefill":
        from qwenvl_pd.prefill_node.service import main as run
    else:
        from qwenvl_pd.decode_node.service import main as run
    return run(cfg)


def _hosts(flag: str | None) -> tuple[str, ...]:
    return tuple(a for a in (flag or "").split(",") if a.strip())


def _add_node_parser(sub, role: str, default_port: int) -> None:
    p = sub.add_parser(role, help=f"run a {role} instance (gRPC)")
    add_model_arg(p)
    p.add_argument("--model", help="Hugging Face checkpoint directory (or the positional MODEL)")
    p.add_argument("--port", type=int, default=default_port)
    p.add_argument("--host", default="127.0.0.1", help="address peers reach this instance at")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--served-model-name", help="default: the model argument as given")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | npu")
    p.add_argument("--transfer-protocol", default="tcp", choices=["tcp", "rdma", "ascend"])
    p.add_argument("--transfer-device", default="", help="RDMA/Ascend device name(s) for Mooncake")
    p.add_argument("--transfer-timeout", type=float, default=10.0, help="seconds; < --lease-seconds")
    p.add_argument("--lease-seconds", type=float, default=30.0)
    p.add_argument("--kv-layer-group", type=int, default=4,
                   help="prefill: report layer-wise KV progress every N layers (0: refuse layer-wise)")
    p.add_argument("--allowed-prefills", help="decode: the prefills (host[:port] or DNS names, comma-"
                   "separated: the proxy's --prefill) it reads KV from; default any a caller names")
    p.add_argument("--allowed-encoders", help="prefill: the encoders (host[:port] or DNS names, comma-"
                   "separated: the proxy's --encode) it reads embeddings from; default any a caller names")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM: report NOT_SERVING, let running streams finish this long")
    p.add_argument("--embedding-store", metavar="HOST:PORT", help="prefill: the mooncake_master whose "
                   "Mooncake Store holds encoders' embeddings (read when an encoder cannot be)")
    p.add_argument("--embedding-read-buffer-mib", type=int, default=256,
                   help="prefill: registered buffer that embeddings read from encoders land in")
    p.add_argument("--instance-id")
    _add_secret_arg(p)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--num-kv-blocks", type=int)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="waiting requests beyond this are refused with RESOURCE_EXHAUSTED (429)")
    p.add_argument("--decode-graphs", default="auto", choices=["auto", "off", "eager"],
                   help="auto: CUDA/ACL graphs for decode steps where available")
    p.add_argument("--limit-images", type=int, default=16)
    p.add_argument("--limit-videos", type=int, default=2)
    add_engine_args(p)
    add_accepted_args(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    _add_cpus_arg(p, f"this {role} instance and its ranks")
    _add_parallel_args(p)
    p.set_defaults(func=_node, parser=p)


def _encode(args: argparse.Namespace) -> int:
    import logging
    from qwenvl_pd.cpus import pin, threads_for
    from qwenvl_pd.encode_node.config import EncodeConfig
    from qwenvl_pd.protos.auth import read_secret
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = EncodeConfig(
        model=args.model, port=args.port, host=args.host, bind=args.bind, device=args.device, dtype=args.dtype,
        embedding_cache_bytes=int(args.embedding_cache_gib * (1 << 30)), embedding_store=args.embedding_store,
        store_segment_bytes=int(args.embedding_store_segment_gib * (1 << 30)), lease_seconds=args.lease_seconds,
        max_encode_batch_tokens=args.max_encode_batch_tokens, transfer_protocol=args.transfer_protocol,
        transfer_device=args.transfer_device, instance_id=args.instance_id or "",
        cluster_secret=read_secret(args.cluster_secret_file or ""), cpus=args.cpus,
        limit_images=args.limit_images, limit_videos=args.limit_videos, drain_seconds=args.drain_seconds)
    pin(cfg.cpus)
    _set_threads(threads_for(args.cpus, args.threads, 1))
    from qwenvl_pd.encode_node.server import main as run
    return run(cfg)


def _add_encode_parser(sub) -> None:
    p = sub.add_parser("encode", help="run an encode instance: the vision tower only (gRPC)")
    add_model_arg(p)
    p.add_argument("--model", help="Hugging Face checkpoint directory (or the positional MODEL)")
    p.add_argument("--port", type=int, default=50053)
    p.add_argument("--host", default="127.0.0.1", help="address peers reach this instance at")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | npu")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="the tower's dtype")
    p.add_argument("--embedding-cache-gib", type=float, default=1.0,
                   help="the embedding pool prefills read from (least recently used first out)")
    p.add_argument("--embedding-store", default="", metavar="HOST:PORT",
                   help="a mooncake_master: also keep embeddings in its Mooncake Store (default: off)")
    p.add_argument("--embedding-store-segment-gib", type=float, default=0.25,
                   help="memory this instance lends the store (its objects there go with it)")
    p.add_argument("--lease-seconds", type=float, default=30.0,
                   help="an embedding handed out stays pinned this long unless released")
    p.add_argument("--max-encode-batch-tokens", type=int, default=16384,
                   help="vision tokens (after the merger) per tower forward; one item may not exceed it")
    p.add_argument("--transfer-protocol", default="tcp", choices=["tcp", "rdma", "ascend"])
    p.add_argument("--transfer-device", default="", help="RDMA/Ascend device name(s) for Mooncake")
    p.add_argument("--instance-id")
    _add_secret_arg(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    _add_cpus_arg(p, "this encode instance")
    p.add_argument("--limit-images", type=int, default=16, help="images per Encode request")
    p.add_argument("--limit-videos", type=int, default=2, help="videos per Encode request")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM: report NOT_SERVING, keep leased embeddings readable this long")
    p.set_defaults(func=_encode, parser=p)


def _add_secret_arg(p) -> None:
    p.add_argument("--cluster-secret-file", help="file with the secret every role shares (or "
                   "$QWENVL_PD_CLUSTER_SECRET); node RPCs without it are refused, KV handles signed")


def _add_parallel_args(p, hidden: bool = False) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help=argparse.SUPPRESS if hidden else "ranks (devices) this instance runs on")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help=argparse.SUPPRESS if hidden else "MoE: each rank owns whole experts")
    p.add_argument("--quantization", choices=["none", "ascend"],
                   help=argparse.SUPPRESS if hidden else "ascend: msModelSlim W8A8 weights (default: "
                   "ascend where quant_model_description.json is beside the weights)")


def _colocated_opener(args: argparse.Namespace):
    """serve --colocated: the proxy runs one engine in-process (built here, never by the proxy)."""
    if not args.colocated_model:
        return None
    from qwenvl_pd.cpus import threads_for
    from qwenvl_pd.engine.engine_config import EngineConfig
    from qwenvl_pd.engine.stack import StackConfig
    from qwenvl_pd.node.colocated import colocated_opener
    engine = EngineConfig(kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
                          max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                          step_fill_tokens=args.step_fill_tokens,
                          enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
                          gpu_memory_utilization=args.gpu_memory_utilization)
    threads = threads_for(args.cpus, 0, args.tensor_parallel_size)
    _set_threads(threads)  # one engine in the proxy's process: it runs on the proxy's --cpus
    mm = {"image": args.max_images_per_request, "video": args.limit_videos}
    return colocated_opener(StackConfig(
        args.colocated_model, args.max_model_len, args.device, args.dtype, limit_mm_per_prompt=mm,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel, threads=threads, engine=engine,
        quantization=args.quantization))


def _proxy(args: argparse.Namespace) -> int:
    from qwenvl_pd.cpus import pin
    from qwenvl_pd.protos.auth import read_secret
    from qwenvl_pd.proxy.config import ProxyConfig, parse_addresses
    from qwenvl_pd.proxy.http.server import main as run
    if args.discover_dns:
        from qwenvl_pd.proxy.cluster.discovery import parse_discover_dns
        parse_discover_dns(args.discover_dns)  # a bad spec fails here, before any start-up work
    cfg = ProxyConfig(
        host=args.host, port=args.port, prefill=parse_addresses(args.prefill),
        decode=parse_addresses(args.decode), encode=parse_addresses(args.encode),
        discover_dns=args.discover_dns or "", encode_timeout_s=args.encode_timeout,
        api_keys=tuple(args.api_key or ()), cache_salt_per_api_key=args.cache_salt_per_api_key,
        cluster_secret=read_secret(args.cluster_secret_file or ""),
        served_model_name=args.served_model_name or "",
        allowed_local_media_path=args.allowed_local_media_path or "",
        allow_private_media=args.allow_private_media, max_concurrent_requests=args.max_concurrent_requests,
        max_images_per_request=args.max_images_per_request, max_media_bytes=args.max_media_bytes,
        max_request_media_bytes=args.max_request_media_bytes,
        media_timeout_s=args.media_timeout, max_image_pixels=args.max_image_pixels,
        max_video_frames=args.max_video_frames,
        health_interval_s=args.health_interval, load_interval_s=args.load_interval,
        prefill_load_cap=args.prefill_load_cap, model_info_timeout_s=args.model_info_timeout,
        prefill_timeout_s=args.prefill_timeout, token_timeout_s=args.token_timeout,
        kv_transfer_mode=args.kv_transfer_mode,
        colocated_model=args.colocated_model or "", cpus=args.cpus)
    pin(cfg.cpus)  # first: the colocated engine's threads start on these cores
    run(cfg, _colocated_opener(args))
    return 0


def _add_proxy_parser(sub) -> None:
    p = sub.add_parser("proxy", help="run the OpenAI-compatible HTTP proxy in front of PD instances")
    p.add_argument("--prefill", help="prefill instances, HOST:PORT[,HOST:PORT...]")
    p.add_argument("--decode", help="decode instances, HOST:PORT[,HOST:PORT...]")
    p.add_argument("--encode", help="encode instances (optional, EPD), HOST:PORT[,HOST:PORT...]")
    p.add_argument("--discover-dns", help="prefill=NAME:PORT,decode=NAME:PORT[,encode=NAME:PORT] "
                   "(headless Services)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", nargs="+", metavar="KEY",
                   help="require Authorization: Bearer KEY, one of these, on /v1 (or $QWENVL_PD_API_KEY)",
                   default=[os.environ["QWENVL_PD_API_KEY"]] if os.environ.get("QWENVL_PD_API_KEY") else None)
    p.add_argument("--cache-salt-per-api-key", action="store_true",
                   help="prefix-cache hits only among requests of the same API key (tenant isolation)")
    p.add_argument("--served-model-name", help="the model name clients send (default: prefill's)")
    _add_secret_arg(p)
    p.add_argument("--allowed-local-media-path", help="serve file:// media from under this directory")
    p.add_argument("--allow-private-media", action="store_true",
                   help="allow media URLs that resolve to private/loopback addresses")
    p.add_argument("--max-concurrent-requests", type=int, default=256, help="beyond this: 429")
    p.add_argument("--max-images-per-request", type=int, default=16)
    p.add_argument("--max-media-bytes", type=int, default=20 << 20)
    p.add_argument("--max-request-media-bytes", type=int, default=256 << 20,
                   help="a request's media bytes times n are refused (400) beyond this")
    p.add_argument("--media-timeout", type=float, default=10.0, help="seconds per media fetch")
    p.add_argument("--max-image-pixels", type=int, default=8192 * 8192,
                   help="largest width*height an image header (or a video frame) may declare")
    p.add_argument("--max-video-frames", type=int, default=100_000,
                   help="most frames a video may declare or hold; refused before decoding")
    p.add_argument("--health-interval", type=float, default=2.0)
    p.add_argument("--load-interval", type=float, default=1.0)
    p.add_argument("--prefill-load-cap", type=int, default=8,
                   help="requests on a prefill before affinity gives way to the least loaded")
    p.add_argument("--model-info-timeout", type=float, default=300.0,
                   help="seconds to wait at start for a prefill to answer")
    p.add_argument("--prefill-timeout", type=float, default=600.0,
                   help="seconds a prefill may take (queueing included) before it is retried elsewhere")
    p.add_argument("--token-timeout", type=float, default=60.0,
                   help="seconds a running request may go without a token before its decode counts as stuck")
    p.add_argument("--encode-timeout", type=float, default=30.0,
                   help="seconds an encode round may take, a retry on another encoder included, before "
                   "prefill gets the media bytes instead")
    p.add_argument("--kv-transfer-mode", default="whole", choices=["whole", "layerwise"],
                   help="whole: decode pulls the KV after prefill; layerwise: group by group while "
                        "prefill computes (prefill's --kv-layer-group)")
    _add_cpus_arg(p, "the proxy (and, under serve --colocated, its engine)")
    p.add_argument("--colocated-model", help=argparse.SUPPRESS)  # serve --colocated
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--max-model-len", type=int, default=8192, help=argparse.SUPPRESS)
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--limit-videos", type=int, default=2, help=argparse.SUPPRESS)
    add_engine_args(p, hidden=True)
    _add_parallel_args(p, hidden=True)
    p.set_defaults(func=_proxy)


def _serve(args: argparse.Namespace) -> int:
    from qwenvl_pd.serve import ServeConfig, main as run
    log_no_effect(args)
    dp = data_parallel_instances(args, args.parser)  # N engines: N prefill + N decode here
    num_prefill, num_decode = (dp, dp) if dp > 1 else (args.num_prefill, args.num_decode)
    share = args.gpu_memory_utilization
    if share and not args.colocated:  # the instances of one machine divide its devices' memory
        share /= num_prefill + num_decode
    proxy_args = list(args.proxy_arg) + _serve_proxy_args(args)
    return run(ServeConfig(
        model=args.model or "", host=args.host, port=args.port, num_prefill=num_prefill,
        num_decode=num_decode, max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
        # vLLM serves the model under the --model argument as given (its base name is an alias)
        served_model_name=args.served_model_name or args.model or "", api_key=args.api_key or "",
        colocated=args.colocated, device=args.device, extra_proxy_args=tuple(proxy_args),
        prefill_tp=args.prefill_tensor_parallel_size or args.tensor_parallel_size,
        decode_tp=args.decode_tensor_parallel_size or args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel, quantization=args.quantization,
        kv_transfer_mode=args.kv_transfer_mode,
        cpus_prefill=args.cpus_prefill, cpus_decode=args.cpus_decode, cpus_proxy=args.cpus_proxy,
        pin=not args.no_pin, max_num_batched_tokens=args.max_num_batched_tokens,
        num_encode=args.num_encode, embedding_cache_gib=args.embedding_cache_gib,
        embedding_store=args.embedding_store or "", cpus_encode=args.cpus_encode,
        embedding_store_gib=args.embedding_store_gib,
        node_args=tuple(engine_flags(args, args.parser, share))))


def _serve_proxy_args(args: argparse.Namespace) -> list[str]:
    """The proxy's share of serve's engine flags: its image bound, and under --colocated the
    engine it runs itself."""
    limit = (args.limit_mm_per_prompt or {}).get("image")
    out = [] if limit is None else ["--max-images-per-request", str(limit)]
    if args.colocated:
        out += engine_flags(args, args.parser, args.gpu_memory_utilization, with_limits=False)
        if "video" in (args.limit_mm_per_prompt or {}):
            out += ["--limit-videos", str(args.limit_mm_per_prompt["video"])]
    return out


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="prefill, decode and proxy on this machine (Mooncake TCP on loopback)")
    add_model_arg(p)
    p.add_argument("--model", help="checkpoint directory, or the positional MODEL (default: a tiny "
                   "RANDOM-weight Qwen2.5-VL)")
    p.add_argument("--host", default="127.0.0.1", help="address the proxy listens on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-prefill", type=int, default=1)
    p.add_argument("--num-decode", type=int, default=1)
    p.add_argument("--num-encode", type=int, default=0, help="encode instances (EPD): they run the vision "
                   "tower and prefill reads their embeddings; 0: prefill encodes itself (PD)")
    p.add_argument("--embedding-cache-gib", type=float, default=1.0, help="each encoder's embedding pool")
    p.add_argument("--embedding-store", choices=["mooncake"], help="start a Mooncake master on loopback: "
                   "encoders put embeddings into its store and every prefill can read them")
    p.add_argument("--embedding-store-gib", type=float, default=1.0, help="memory the store's own client "
                   "lends it (--embedding-store mooncake): its entries outlive the encoders")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--served-model-name", help="default: the model argument as given")
    p.add_argument("--api-key", default=os.environ.get("QWENVL_PD_API_KEY"))
    p.add_argument("--kv-transfer-mode", default="whole", choices=["whole", "layerwise"],
                   help="how decode gets the KV (the proxy's --kv-transfer-mode)")
    p.add_argument("--colocated", action="store_true",
                   help="one engine that prefills and decodes (the baseline PD is compared with)")
    p.add_argument("--proxy-arg", action="append", default=[], metavar="ARG",
                   help="pass ARG on to `qwenvl-pd proxy` (repeatable), e.g. --proxy-arg=--allow-private-media")
    _add_parallel_args(p)
    p.add_argument("--prefill-tensor-parallel-size", type=int, help="default: --tensor-parallel-size")
    p.add_argument("--decode-tensor-parallel-size", type=int, help="default: --tensor-parallel-size")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="prefill chunk budget per step of every engine (prefill nodes, colocated)")
    _add_cpus_arg(p, "every prefill instance", "--cpus-prefill")
    _add_cpus_arg(p, "every decode instance", "--cpus-decode")
    _add_cpus_arg(p, "every encode instance (default: half of prefill's cores)", "--cpus-encode")
    _add_cpus_arg(p, "the proxy (--colocated: its one process, engine included, gets the union of "
                  "the three lists: the same cores as the PD run)", "--cpus-proxy")
    p.add_argument("--no-pin", action="store_true", help="with no --cpus-* given, leave every role "
                   "on every core (default: decode on the first half, prefill and proxy on the rest)")
    add_engine_args(p)
    add_accepted_args(p)
    add_data_parallel_args(p)
    p.set_defaults(func=_serve, parser=p)




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl-pd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in HF format")
    tiny.add_argument("--arch", required=True, choices=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                      help="the weights' dtype, declared in config.json")
    tiny.add_argument("--quantize", default="none", choices=["none", "w8a8", "w8a8_dynamic"],
                      help="write msModelSlim's W8A8 layout (static or dynamic activations)")
    tiny.set_defaults(func=_make_tiny)
    gen = sub.add_parser("generate", help="one offline chat completion (text and images)")
    gen.add_argument("--model", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--image", action="append", default=[])
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--max-model-len", type=int, default=8192)
    _add_parallel_args(gen)
    gen.set_defaults(func=_generate)
    _add_node_parser(sub, "prefill", 50051)
    _add_node_parser(sub, "decode", 50052)
    _add_encode_parser(sub)
    _add_proxy_parser(sub)
    _add_serve_parser(sub)
    sub.add_parser("bench", help="load-test an OpenAI endpoint (see `qwenvl-pd bench --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every later argument belongs to the benchmark's own parser
        from qwenvl_pd.loadgen.serve import main as bench
        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(normalize_argv(argv))
    if args.command in ("serve", "prefill", "decode", "encode"):
        resolve_model(args, args.parser)
        if args.command != "serve" and not args.model:
            parser.error(f"{args.command}: the model is required (MODEL or --model)")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # the project's errors carry a complete message; a traceback would only bury it
        print(f"qwenvl-pd {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
