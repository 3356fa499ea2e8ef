import dataclasses
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
from qwenvl_pd.kv_transfer.handle import KVHandle, KVSegment, LayoutFingerprint
from qwenvl_pd.messages import (DecodeRequest, EmbeddingRelease, EncodeRequest, EncodeResult, LoadReport, MediaItem, ModelInfo, PrefillRequest,
                                PrefillResult, PrefillStreamEvent, KVProgress, PromptLogprobs, SampledToken,
                                TokenEvent)
from qwenvl_pd.protos import qwenvl_pd_pb2 as pb
from qwenvl_pd.protos import qwenvl_pd_pb2_grpc as pb_grpc
from qwenvl_pd.protos.convert import PAIRS, SKIPPED, from_proto, to_proto
from qwenvl_pd.sampling_params import SamplingParams, StructuredOutputsParams

ROOT = Path(__file__).resolve().parents[3]
PROTOS = ROOT / "qwenvl_pd" / "protos"
GENERATED = ["qwenvl_pd_pb2.py", "qwenvl_pd_pb2.pyi", "qwenvl_pd_pb2_grpc.py"]

FP = LayoutFingerprint(model="Qwen/Qwen2.5-VL-7B-Instruct", dtype="bfloat16", block_size=16,
                       num_layers=28, num_kv_heads=4, head_dim=128, tp_size=2, tp_rank=1)
# every field away from its default, floats that do not survive float32, ints at their limits
SP = SamplingParams(n=2, temperature=0.1 + 0.2, top_p=0.95, top_k=20, min_p=1e-300, seed=-(2 ** 63),
                    max_completion_tokens=7, min_tokens=3, stop_token_ids=[151645, 0],
                    ignore_eos=True, logprobs=5, repetition_penalty=1.05, presence_penalty=-2.0,
                    frequency_penalty=0.7, skip_special_tokens=False, prompt_logprobs=20,
                    logit_bias={0: -100.0, 2 ** 31 - 1: 0.1 + 0.2},
                    structured_outputs=StructuredOutputsParams(json='{"type": "object"}',
                                                               resume_token_ids=(5, 2 ** 31 - 1)))
# the other kinds of grammar, one each (a spec holds exactly one)
GRAMMARS = [SP.structured_outputs, *(StructuredOutputsParams(**kind) for kind in (
    {"regex": "[a-z]+\u00e9"}, {"choice": ("yes", "")}, {"grammar": 'start: "x"'}, {"json_object": True}))]
TOKEN = SampledToken(token_id=151643, logprob=-0.123456789012345,
                     top_logprobs=((151643, -0.123456789012345), (0, -7.5e-10)))
# float32 values (the engine's), -inf included, and ranks up to the vocabulary
PROMPT_LP = PromptLogprobs(num_top=2, logprobs=(-0.5, float("-inf")), ranks=(1, 151935),
                           top_ids=(7, 151935, 0, 1), top_logprobs=(-0.5, -1.25, -2.0 ** -25, -2.0))
HANDLE = KVHandle(instance_id="prefill-0", transfer_address="10.0.0.7:17777",
                  kv_base_ptr=2 ** 64 - 2 ** 20, block_bytes=16 * 4 * 128 * 2, region_num_blocks=4096,
                  block_ids=(4095, 7, 8, 9), num_tokens=50, fingerprint=FP,
                  lease_expires_unix_ms=1_760_000_000_123, control_address="10.0.0.7:50051",
                  rank_segments=(KVSegment("10.0.0.8:17778", 2 ** 64 - 2 ** 21),), signature=b"\x00\xffmac",
                  request_id="chatcmpl-7")
IMAGE = MediaItem(kind="image", content_hash="ab" * 32, grid_thw=(1, 34, 52), data=b"\x89PNG\x00\xff")
VIDEO = MediaItem(kind="video", content_hash="cd" * 32, grid_thw=(4, 16, 16), frames=(b"jpg1", b""),
                  fps=29.97, second_per_grid_t=0.5, timestamps=(0.25, 1.25, 2.0 / 3))
EMBEDDING = EmbeddingHandle(key="ef" * 32, instance_id="encode-0", transfer_address="10.0.0.9:17779",
                            address=2 ** 64 - 2 ** 22, nbytes=3 * 64 * (1 + 2) * 2, num_tokens=64,
                            hidden_size=3, dtype="bfloat16", vision_fingerprint="0f" * 32, num_deepstack=2,
                            lease_expires_unix_ms=1_760_000_000_456, control_address="10.0.0.9:50053",
                            lease_id="lease-\u00e9", in_store=True, signature=b"\x00sig")
ENCODED = MediaItem(kind="image", content_hash="ab" * 32, grid_thw=(1, 16, 16), embedding=EMBEDDING)
PREFILL_REQ = PrefillRequest(request_id="req-1", prompt_token_ids=(151644, 151655, 2 ** 31 - 1),
                             media=(IMAGE, VIDEO), sampling=SP, lease_ms=30_000, cache_salt="tenant-\u00e9")
PREFILL_RESULT = PrefillResult(request_id="req-1", first_token=TOKEN, handle=HANDLE,
                               mrope_position_delta=-1234, prompt_len=50, num_cached_tokens=32,
                               finish_reason="length", prompt_logprobs=PROMPT_LP)
DECODE_REQ = DecodeRequest(request_id="req-1", handle=HANDLE, first_token=TOKEN, prompt_token_ids=(1, 2, 3),
                           prompt_len=3, mrope_position_delta=-(2 ** 40), sampling=SP, num_output_tokens=2,
                           layerwise=True)
SAMPLES = [
    SP,
    *GRAMMARS,
    SamplingParams(),  # skip_special_tokens=True: off the proto3 zero
    FP,
    HANDLE,
    TOKEN,
    PROMPT_LP,
    IMAGE,
    VIDEO,
    PREFILL_REQ,
    PrefillRequest(request_id="req-2", prompt_token_ids=(1,), media=(ENCODED,)),
    EMBEDDING,
    ENCODED,
    EncodeRequest(request_id="req-1", media=(IMAGE, VIDEO), lease_ms=5_000),
    EncodeResult(handles=(EMBEDDING, EMBEDDING), hits=1),
    EmbeddingRelease(lease_ids=("a", "b"), instance_id="encode-0"),
    PREFILL_RESULT,
    HANDLE.rank_segments[0],
    DECODE_REQ,
    PrefillStreamEvent(announce=HANDLE, result=PREFILL_RESULT),
    KVProgress(tokens_ready=32, chunk_tokens=48, layers_ready=12, result=PREFILL_RESULT),
    TokenEvent(token=TOKEN, finish_reason="error", num_prompt_tokens=50, num_output_tokens=9,
               error="KV read timed out", num_cached_tokens=32, prompt_logprobs=PROMPT_LP),
    LoadReport(role="decode", instance_id="decode-3", running=5, waiting=2, blocks_used=100,
               blocks_total=4096, kv_transfers_total=17, kv_transfer_bytes_total=2 ** 40 + 1,
               kv_transfer_seconds_total=0.1 + 0.7, prefix_cache_queries=90, prefix_cache_hits=45,
               requests_total=3),
    LoadReport(role="encode", instance_id="encode-0", running=1, embedding_hits=4, embedding_store_hits=2,
               embedding_misses=3, encode_seconds_total=0.1 + 0.2, embedding_bytes_used=2 ** 33,
               embedding_bytes_total=2 ** 34, embedding_leases=2, embedding_reads=5,
               embedding_read_bytes=2 ** 40 + 3, embedding_read_failures=1),
    ModelInfo(served_model_name="qwen-vl", family="qwen3_vl", tokenizer_json=b'{"model": "\xc3\xa9"}',
              tokenizer_config_json=b"{}", chat_template="{% for m in messages %}\u00e9{% endfor %}",
              preprocessor_config_json='{"patch_size": 16}', max_model_len=262144,
              eos_token_ids=(151645, 151643), vision_start_token_id=151652, vision_end_token_id=151653,
              image_token_id=151655, video_token_id=151656, video_preprocessor_config_json='{"fps": 2}',
              generation_config_json='{"top_k": 20}'),
]


def wire(obj):
    msg = to_proto(obj)
    return from_proto(type(msg).FromString(msg.SerializeToString()))


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_round_trip_through_bytes(obj):
    back = wire(obj)
    assert type(back) is type(obj)
    assert back == obj


def test_samples_put_every_field_of_every_message_on_the_wire():
    seen = {PAIRS[cls]: set() for cls in PAIRS}
    for obj in SAMPLES:
        msg = to_proto(obj)
        seen[type(msg)] |= {fd.name for fd, _ in msg.ListFields()}
    assert seen == {msg: set(msg.DESCRIPTOR.fields_by_name) for msg in seen}


@pytest.mark.parametrize("cls", list(PAIRS), ids=lambda c: c.__name__)
def test_dataclass_and_proto_have_the_same_fields(cls):
    names = {f.name for f in dataclasses.fields(cls)} - SKIPPED.get(cls, set())
    assert names == set(PAIRS[cls].DESCRIPTOR.fields_by_name)


def test_unset_optionals_and_defaults_round_trip():
    sp = SamplingParams(seed=None, max_tokens=None, logprobs=None)
    assert wire(sp) == sp and wire(sp).max_tokens is None
    assert wire(SamplingParams()) == SamplingParams()
    assert wire(IMAGE) == IMAGE and wire(IMAGE).second_per_grid_t is None and wire(IMAGE).fps is None
    assert wire(SampledToken(5)) == SampledToken(5)
    end = TokenEvent(finish_reason="abort", num_output_tokens=4)
    assert wire(end) == end and wire(end).token is None
    req = PrefillRequest(request_id="r", prompt_token_ids=[1, 2])
    assert wire(req) == req and wire(req).sampling == SamplingParams()


def test_stop_strings_stay_at_the_proxy():
    sp = SamplingParams(stop=["</answer>"], max_tokens=4)
    assert wire(sp) == dataclasses.replace(sp, stop=None)


def test_values_are_exact_on_the_wire():
    back = wire(PREFILL_RESULT)
    assert back.first_token.logprob == -0.123456789012345
    assert back.handle.kv_base_ptr == 2 ** 64 - 2 ** 20
    assert back.mrope_position_delta == -1234
    assert wire(SP).temperature == 0.1 + 0.2 and wire(SP).seed == -(2 ** 63)
    assert wire(VIDEO).timestamps == (0.25, 1.25, 2.0 / 3)
    assert isinstance(wire(HANDLE).block_ids, tuple) and isinstance(wire(SP).stop_token_ids, list)


def test_bad_wire_messages_are_refused():
    with pytest.raises(ValueError, match="first_token is required"):
        from_proto(pb.PrefillResponse())
    with pytest.raises(ValueError, match="media kind"):
        from_proto(pb.MediaItem(content_hash="x", grid_thw=pb.GridTHW(t=1, h=2, w=2), data=b"x"))
    with pytest.raises(ValueError, match="role"):
        from_proto(pb.LoadReport(instance_id="x"))
    with pytest.raises(ValueError, match="n must be"):
        from_proto(pb.SamplingParams())  # proto3 zeros are not SamplingParams' defaults
    with pytest.raises(ValueError, match="unknown value"):
        to_proto(_bad_role())


def _bad_role():
    report = LoadReport(role="decode", instance_id="x")
    object.__setattr__(report, "role", "proxy")
    return report


def test_dataclasses_validate_and_store_tuples():
    with pytest.raises(ValueError, match="needs data, frames or an embedding handle"):
        MediaItem(kind="image", content_hash="h", grid_thw=(1, 2, 2))
    with pytest.raises(ValueError, match="data or frames, not both"):
        MediaItem(kind="video", content_hash="h", grid_thw=(1, 2, 2), data=b"v", frames=[b"x"])
    with pytest.raises(ValueError, match="do not hold 192 rows of 3"):
        dataclasses.replace(EMBEDDING, nbytes=1000)
    assert EMBEDDING.element_size == 2
    with pytest.raises(ValueError, match="only a video"):
        MediaItem(kind="image", content_hash="h", grid_thw=(1, 2, 2), frames=[b"x"])
    with pytest.raises(ValueError, match="finish_reason"):
        TokenEvent(finish_reason="eos")
    with pytest.raises(ValueError, match="outside the region"):
        dataclasses.replace(HANDLE, block_ids=[4096])
    with pytest.raises(ValueError, match="do not fit"):
        dataclasses.replace(HANDLE, num_tokens=65)
    assert dataclasses.replace(HANDLE, block_ids=[4095, 7, 8, 9]) == HANDLE
    assert SampledToken(1, top_logprobs=[[1, -0.5]]).top_logprobs == ((1, -0.5),)
    with pytest.raises(ValueError, match="2 positions need 2 ranks and 2 x 2 top entries"):
        dataclasses.replace(PROMPT_LP, top_ids=(7, 1, 0))
    assert PROMPT_LP.top(1) == ((0, -2.0 ** -25), (1, -2.0)) and len(PROMPT_LP) == 2


def test_block_address_is_layer_major():
    h = dataclasses.replace(HANDLE, kv_base_ptr=1000, block_bytes=10, region_num_blocks=100, block_ids=[9],
                            num_tokens=16)
    assert h.block_address(0, 0, 0) == 1000
    assert h.block_address(0, 0, 7) == 1070
    assert h.block_address(0, 1, 7) == 1000 + (100 + 7) * 10
    assert h.block_address(3, 1, 9) == 1000 + ((3 * 2 + 1) * 100 + 9) * 10


def test_fingerprint_mismatch_names_the_first_differing_field():
    assert FP.mismatch(dataclasses.replace(FP)) is None
    assert FP.mismatch(dataclasses.replace(FP, block_size=32)) == "block_size: prefill 16, decode 32"
    both = dataclasses.replace(FP, dtype="float16", head_dim=64)
    assert FP.mismatch(both) == "dtype: prefill bfloat16, decode float16"
    # another TP size or rank maps heads (kv_transfer/heads.py); a size that splits none does not
    assert FP.mismatch(dataclasses.replace(FP, tp_size=1, tp_rank=0)) is None
    assert (FP.mismatch(dataclasses.replace(FP, tp_size=3, tp_rank=0))
            == "tp_size: decode 3 cannot split 4 KV heads (neither divides the other)")
    assert (FP.mismatch(dataclasses.replace(FP, num_layers=36), names=("remote", "local"))
            == "num_layers: remote 28, local 36")
    assert wire(FP).mismatch(FP) is None


def test_regenerating_the_protos_changes_no_byte(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env)
    assert sorted(p.name for p in tmp_path.iterdir()) == GENERATED
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (PROTOS / name).read_bytes(), (
            f"{name} is stale: run scripts/gen_protos.sh and commit the result")


class _Prefill(pb_grpc.PrefillServicer):
    def Prefill(self, request, context):
        req = from_proto(request)
        return to_proto(PrefillResult(request_id=req.request_id, first_token=TOKEN, handle=HANDLE,
                                      mrope_position_delta=-3, prompt_len=len(req.prompt_token_ids)))


class _Decode(pb_grpc.DecodeServicer):
    def Decode(self, request, context):
        req = from_proto(request)
        yield to_proto(TokenEvent(token=SampledToken(42), num_prompt_tokens=req.prompt_len,
                                  num_output_tokens=2))
        yield to_proto(TokenEvent(finish_reason="length", num_prompt_tokens=req.prompt_len,
                                  num_output_tokens=2))


def test_generated_services_work_over_grpc():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_PrefillServicer_to_server(_Prefill(), server)
    pb_grpc.add_DecodeServicer_to_server(_Decode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            result = from_proto(pb_grpc.PrefillStub(channel).Prefill(to_proto(PREFILL_REQ), timeout=10))
            assert result == PrefillResult(request_id="req-1", first_token=TOKEN, handle=HANDLE,
                                           mrope_position_delta=-3, prompt_len=3)
            events = [from_proto(e) for e in pb_grpc.DecodeStub(channel).Decode(
                to_proto(DECODE_REQ), timeout=10)]
            assert events == [TokenEvent(token=SampledToken(42), num_prompt_tokens=3, num_output_tokens=2),
                              TokenEvent(finish_reason="length", num_prompt_tokens=3, num_output_tokens=2)]
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.DecodeStub(channel).GetLoad(pb.LoadRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)
