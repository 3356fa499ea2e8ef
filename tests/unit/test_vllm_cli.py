"""vLLM's command line on serve, prefill and decode: the guides' flags parse to what they mean,
unknown --additional-config keys and multi-node data parallelism are refused with the reason."""
import subprocess
import sys

import pytest

from qwenvl_pd.cli import build_parser
from qwenvl_pd.engine.kv_cache import utilization_budget
from qwenvl_pd.vllm_cli import data_parallel_instances, engine_flags, normalize_argv, resolve_model

SEED_000 = "serve /m/Qwen3-VL-8B-Instruct --dtype bfloat16 --max_model_len 16384 --max-num-batched-tokens 16384"
SEED_001 = ("serve /data/Qwen2.5-VL-32B-Instruct-w8a8 --host 0.0.0.0 --port 8888 --served-model-name qwen25_vl "
            "--quantization ascend --async-scheduling --tensor-parallel-size 2 --max-model-len 30000 "
            "--max-num-batched-tokens 50000 --max-num-seqs 30 --no-enable-prefix-caching --trust-remote-code "
            "--additional-config {\"enable_weight_nz_layout\":true}")
SEED_002 = ("serve Qwen/Qwen3-VL-235B-A22B-Instruct --host 0.0.0.0 --port 8000 --data-parallel-size 2 "
            "--api-server-count 2 --data-parallel-size-local 1 --data-parallel-address 10.0.0.1 "
            "--data-parallel-rpc-port 13389 --seed 1024 --served-model-name qwen3 --tensor-parallel-size 8 "
            "--enable-expert-parallel --max-num-seqs 16 --max-model-len 262144 --max-num-batched-tokens 4096 "
            "--trust-remote-code --async-scheduling --gpu-memory-utilization 0.9")


def parse(line: str):
    args = build_parser().parse_args(normalize_argv(line.split()))
    resolve_model(args, args.parser)
    return args


def test_underscore_spellings_become_flags_and_values_stay():
    assert normalize_argv(["--max_model_len", "16_384", "--served_model_name=a_b", "x_y"]) == [
        "--max-model-len", "16_384", "--served-model-name=a_b", "x_y"]


def test_seed_000_serve_line():
    a = parse(SEED_000)
    assert (a.model, a.dtype, a.max_model_len, a.max_num_batched_tokens) == (
        "/m/Qwen3-VL-8B-Instruct", "bfloat16", 16384, 16384)
    assert engine_flags(a, a.parser, None) == ["--dtype", "bfloat16"]


def test_seed_001_serve_line():
    a = parse(SEED_001)
    assert (a.model, a.port, a.served_model_name, a.quantization, a.tensor_parallel_size) == (
        "/data/Qwen2.5-VL-32B-Instruct-w8a8", 8888, "qwen25_vl", "ascend", 2)
    assert (a.max_num_seqs, a.no_prefix_caching, a.async_scheduling, a.trust_remote_code) == (30, True, True, True)
    assert a.additional_config == {"enable_weight_nz_layout": True}
    assert engine_flags(a, a.parser, 0.45) == ["--max-num-seqs", "30", "--no-enable-prefix-caching",
                                               "--gpu-memory-utilization", "0.45"]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_nodes_take_the_model_positionally_and_vllms_flags(role):
    a = parse(f"{role} /m/tiny --limit_mm_per_prompt image=3,video=0 --seed 7 --no-enable-prefix-caching "
              "--gpu-memory-utilization 0.5 --dtype float16")
    assert (a.model, a.limit_images, a.limit_videos, a.seed, a.no_prefix_caching) == ("/m/tiny", 3, 0, 7, True)
    assert (a.gpu_memory_utilization, a.dtype) == (0.5, "float16")
    assert parse(f"{role} --model /m/tiny --limit-mm-per-prompt {{\"image\":2}}").limit_images == 2


def test_data_parallel_on_one_machine_is_more_instances_and_over_machines_is_refused_with_the_commands():
    a = parse("serve /m/tiny --data-parallel-size 2")
    assert data_parallel_instances(a, a.parser) == 2
    a = parse(SEED_002)
    with pytest.raises(ValueError) as e:
        data_parallel_instances(a, a.parser)
    message = str(e.value)
    assert ("qwenvl-pd prefill Qwen/Qwen3-VL-235B-A22B-Instruct --host NODEi --port 50051 --max-model-len "
            "262144 --tensor-parallel-size 8 --enable-expert-parallel --max-num-batched-tokens 4096 "
            "--max-num-seqs 16 --seed 1024 --gpu-memory-utilization 0.45") in message
    assert ("qwenvl-pd proxy --port 8000 --served-model-name qwen3 --prefill NODE0:50051,NODE1:50051 "
            "--decode NODE0:50052,NODE1:50052") in message


@pytest.mark.parametrize("line, error", [
    ("serve /m --additional-config {\"enable_weight_nz_layout\":true,\"torchair_graph_config\":{}}",
     "--additional-config key(s) torchair_graph_config are not known here"),
    ("serve /m --limit-mm-per-prompt {\"audio\":1}", "modalities are ('image', 'video')"),
    ("serve /m --dtype half", "invalid choice: 'half'"),
    ("serve /m --model /n", "the model is given twice"),
    ("prefill --port 1", "prefill: the model is required"),
])
def test_bad_lines_are_refused_by_name(line, error):
    proc = subprocess.run([sys.executable, "-m", "qwenvl_pd.cli", *line.split()], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and error in proc.stderr, proc.stderr


def test_gpu_memory_utilization_gives_the_kv_pool_what_the_weights_leave():
    assert utilization_budget(80 << 30, 16 << 30, 0.45) == int(0.45 * (80 << 30)) - (16 << 30)
    with pytest.raises(ValueError, match="leaves no room for the KV cache beside the 16.0 GiB"):
        utilization_budget(20 << 30, 16 << 30, 0.5)
