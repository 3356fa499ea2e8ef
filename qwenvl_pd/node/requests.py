"""A PrefillRequest (token ids with expanded placeholders + raw media) -> the engine's Sequence,
and a prefilled Sequence's prompt logprobs -> their message; the same for the prefill node and
the colocated engine."""
import io

from PIL import Image

from qwenvl_pd.engine import prompt_logprobs as prompt_rows
from qwenvl_pd.engine.grammar import Grammars
from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.messages import PrefillRequest, PromptLogprobs
from qwenvl_pd.model.inputs import InputProcessor
from qwenvl_pd.sampling_params import SamplingParams


def sequence_from_request(inputs: InputProcessor, req: PrefillRequest, max_model_len: int,
                          grammars: Grammars | None = None) -> Sequence:
    """Media re-processed from their bytes; raises ValueError/InputError naming what is wrong."""
    check_grammar(grammars, req.sampling)
    images = [m.data for m in req.media if m.kind == "image"]
    videos = [list(_frames(m)) if m.frames else m.data for m in req.media if m.kind == "video"]
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


def _frames(item) -> list[Image.Image]:
    return [Image.open(io.BytesIO(f)) for f in item.frames]


def _check_grids(req: PrefillRequest, prompt) -> None:
    for i, (sent, item) in enumerate(zip(req.media, prompt.items)):
        if tuple(sent.grid_thw) != tuple(item.grid_thw):
            raise ValueError(f"media {i}: the request says grid {tuple(sent.grid_thw)}, the image "
                             f"gives {tuple(item.grid_thw)} with this model's processor")
