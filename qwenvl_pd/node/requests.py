"""Between the wire and the engine: a PrefillRequest (token ids with expanded placeholders + raw
media) -> the engine's Sequence, and a Sequence's latest token -> its TokenEvent (prompt
logprobs included); the same for the prefill node, the decode node and the colocated engine."""
import io
from collections.abc import Sequence as Sequence_
from itertools import zip_longest

from PIL import Image

from qwenvl_pd.engine import prompt_logprobs as prompt_rows
from qwenvl_pd.engine.grammar import Grammars
from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.finish_reason import FinishReason
from qwenvl_pd.messages import MediaItem, PrefillRequest, PromptLogprobs, SampledToken, TokenEvent
from qwenvl_pd.model.inputs import Embedded, InputProcessor
from qwenvl_pd.model.vision import VisionEmbeds
from qwenvl_pd.sampling_params import SamplingParams


def sequence_from_request(inputs: InputProcessor, req: PrefillRequest, max_model_len: int,
                          grammars: Grammars | None = None,
                          embeds: Sequence_[VisionEmbeds | None] = ()) -> Sequence:
    """Media re-processed from their bytes, or placed by their grids where embeds[i] (item i's,
    read from an encoder) is given; raises ValueError/InputError naming what is wrong."""
    check_grammar(grammars, req.sampling)
    given = [_given(m, e) for m, e in zip_longest(req.media, embeds[:len(req.media)])]
    images = [g for m, g in zip(req.media, given) if m.kind == "image"]
    videos = [g for m, g in zip(req.media, given) if m.kind == "video"]
    fps = [m.fps for m in req.media if m.kind == "video"]
    prompt = inputs.process_expanded(list(req.prompt_token_ids), images, videos, fps or None)
    _check_grids(req, prompt)
    params = req.sampling
    room = max_model_len - len(prompt.token_ids)
    if params.max_tokens is None or params.max_tokens > room:
        raise ValueError(f"prompt ({len(prompt.token_ids)} tokens) + max_tokens "
                         f"({params.max_tokens}) exceeds max_model_len ({max_model_len})")
    return Sequence(req.request_id, prompt.token_ids, prompt.positions, prompt.mrope_delta,
                    params, items=prompt.items, cache_salt=req.cache_salt)


def token_event(seq: Sequence, first: bool = False) -> TokenEvent:
    """seq's latest token (none once aborted or handed back) and its end, if it ended. first:
    with what only a sample's first event carries (prefix-cache hits, prompt logprobs)."""
    token = None
    if seq.finish_reason not in (FinishReason.ABORT, FinishReason.PREEMPTED):
        logprob, top = seq.logprobs[-1] if seq.logprobs else (None, ())
        token = SampledToken(seq.token_ids[-1], logprob, tuple(top))
    # PREFILLED ends the sequence on prefill, not the request: decode goes on with it
    ended = seq.finish_reason not in (None, FinishReason.PREFILLED)
    return TokenEvent(token, seq.finish_reason.value if ended else "", seq.prompt_len,
                      seq.num_output, num_cached_tokens=seq.num_cached if first else 0,
                      prompt_logprobs=prompt_logprobs(seq) if first else None)


def prompt_logprobs(seq: Sequence) -> PromptLogprobs | None:
    """seq's prompt rows once its prompt is computed (None when they were not asked for)."""
    rows = prompt_rows.of_sequence(seq)
    if rows is None:
        return None
    return PromptLogprobs(rows.top_ids.shape[1], rows.logprobs.tolist(), rows.ranks.tolist(),
                          rows.top_ids.flatten().tolist(), rows.top_logprobs.flatten().tolist())


def check_grammar(grammars: Grammars | None, params: SamplingParams) -> None:
    """A structured-output spec must compile for this node's tokenizer before the engine sees
    it: the engine thread never handles a bad grammar. Raises ValueError."""
    spec = params.structured_outputs
    if spec is None:
        return
    if grammars is None:
        raise ValueError("this engine has no grammar support (structured_outputs)")
    error = grammars.error(spec)
    if error:
        raise ValueError(f"structured_outputs: {error}")


def _given(item: MediaItem, embeds: VisionEmbeds | None):
    if embeds is not None:
        return Embedded(item.grid_thw, item.embedding.key if item.embedding else item.content_hash,
                        embeds, item.second_per_grid_t)
    if item.embedding is not None and not (item.data or item.frames):
        raise ValueError(f"media item {item.content_hash[:16]} comes as an embedding handle that "
                         "was not read")
    if item.kind == "video" and item.frames:
        return list(_frames(item))
    return item.data


def _frames(item) -> list[Image.Image]:
    return [Image.open(io.BytesIO(f)) for f in item.frames]


def _check_grids(req: PrefillRequest, prompt) -> None:
    for i, (sent, item) in enumerate(zip(req.media, prompt.items)):
        if tuple(sent.grid_thw) != tuple(item.grid_thw):
            raise ValueError(f"media {i}: the request says grid {tuple(sent.grid_thw)}, the image "
                             f"gives {tuple(item.grid_thw)} with this model's processor")
