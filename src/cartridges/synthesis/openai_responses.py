"""Chat completion responses of OpenAI-compatible servers, read into :class:`Completion`.

Responses are decoded straight into a few typed fields with ``msgspec``: an answer of 512 tokens
with top-20 log-probabilities is ~10k entries, and building one pydantic object per entry (what
the ``openai`` client does) costs more CPU than everything else in the client together. Token
ids come as ``token_id:<id>`` (vLLM's ``return_tokens_as_token_ids``, the project's server),
otherwise each token string is mapped through the student's tokenizer and refused if unknown.

Sending requests, retrying and the server checks are ``openai_backend``'s business.
"""

from __future__ import annotations

import msgspec
import numpy as np
from transformers import PreTrainedTokenizerBase

from cartridges.chat import end_of_turn_id
from cartridges.synthesis.backends import BackendError, Completion


# --------------------------------------------------------------------------- response shape
# Only the fields self-study reads; msgspec skips the rest (e.g. each entry's ``bytes``) in C.
class _TopLogprob(msgspec.Struct):
    token: str
    logprob: float


class _TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    top_logprobs: list[_TopLogprob] | None = None


class _Logprobs(msgspec.Struct):
    content: list[_TokenLogprob] | None = None


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class _ChatCompletion(msgspec.Struct):
    choices: list[_Choice]


_DECODER = msgspec.json.Decoder(_ChatCompletion)


class MalformedResponse(ValueError):
    """A 200 response whose body cannot be used (retried like a transient failure)."""


class ResponseReader:
    """Reads responses in the student's vocabulary (its tokenizer maps token strings to ids)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.end_of_turn = end_of_turn_id(tokenizer)
        self._turn_ends = {self.end_of_turn, tokenizer.eos_token_id}
        self._vocabulary: dict[str, int] | None = None

    def completion(self, raw: bytes, top_logprobs: int) -> Completion:
        """The completion of one response body, with its top ``top_logprobs`` per token.

        Raises:
            MalformedResponse: not a chat completion, or unusable log-probabilities.
            BackendError: no log-probabilities at all, or a token the student does not know.
        """
        try:
            response = _DECODER.decode(raw)
        except msgspec.DecodeError as error:
            raise MalformedResponse(f"not a chat completion ({error})") from error
        if not response.choices:
            raise MalformedResponse("no choices")
        choice = response.choices[0]
        content = choice.logprobs.content if choice.logprobs is not None else None
        if not content:
            raise BackendError(
                "Malformed server response: no logprobs. The server must support "
                "`logprobs`/`top_logprobs` on chat completions."
            )
        token_ids = self._token_ids([entry.token for entry in content]).tolist()
        top_ids, top_values = self._top_k(content, top_logprobs)
        stopped = choice.finish_reason == "stop"
        if stopped and token_ids[-1] not in self._turn_ends:
            # Servers often leave the stop token out; the turn still ends with the template's
            # end of turn, but with no teacher distribution to distil at that position.
            token_ids.append(self.end_of_turn)
        # The text is the student tokenizer's decoding of the ids, as the local backend's: the
        # server's own text can differ (e.g. a message that ends inside a UTF-8 character), and
        # later turns re-render this text.
        text = self.tokenizer.decode(
            [t for t in token_ids if t not in self._turn_ends], skip_special_tokens=True
        ).strip()
        return Completion(
            token_ids=token_ids,
            text=text,
            stopped=stopped,
            top_ids=top_ids,
            top_logprobs=top_values,
        )

    def _token_id(self, token: str) -> int:
        if token.startswith("token_id:"):
            return int(token[9:])
        if self._vocabulary is None:
            self._vocabulary = self.tokenizer.get_vocab()
        token_id = self._vocabulary.get(token)
        if token_id is None:
            raise BackendError(
                f"Server returned token {token!r}, unknown to the student tokenizer."
            )
        return token_id

    def _token_ids(self, tokens: list[str]) -> np.ndarray:
        """Ids of many tokens at once: ``token_id:<id>`` strings are parsed in one C call."""
        text = " ".join(tokens)
        if text.count("token_id:") == len(tokens):
            ids = np.fromstring(text.replace("token_id:", ""), dtype=np.int64, sep=" ")
            if len(ids) == len(tokens):
                return ids.astype(np.int32)
        return np.array([self._token_id(token) for token in tokens], dtype=np.int32)

    def _top_k(self, content: list[_TokenLogprob], k: int) -> tuple[np.ndarray, np.ndarray]:
        """``[T, k]`` top ids and log-probabilities (-inf where a server sent fewer than k)."""
        ids = np.zeros((len(content) if k else 0, k), dtype=np.int32)
        values = np.full(ids.shape, -np.inf, dtype=np.float32)
        if not k:
            return ids, values
        tops = [entry.top_logprobs for entry in content]
        widths = [len(top) if top else 0 for top in tops]
        if min(widths) == 0:
            raise MalformedResponse(f"token {widths.index(0)} has no top_logprobs")
        if min(widths) == max(widths) == k:  # the usual case: one flat parse
            flat = [entry for top in tops for entry in top]
            ids[:] = self._token_ids([entry.token for entry in flat]).reshape(len(tops), k)
            values[:] = np.array([entry.logprob for entry in flat], np.float32).reshape(-1, k)
        else:
            for position, top in enumerate(tops):
                top = top[:k]
                ids[position, : len(top)] = self._token_ids([entry.token for entry in top])
                values[position, : len(top)] = [entry.logprob for entry in top]
        if np.isnan(values).any() or (values > 1e-4).any():
            raise MalformedResponse("log-probabilities that are NaN or above 0")
        return ids, values
