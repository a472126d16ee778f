"""Generated tokens to answer text: incremental detokenisation and stop strings, in one place.

Streamed and whole answers go through the same :class:`TextStream`: a whole answer
(:func:`render`) is the stream of its row's tokens, collected. So the two cannot disagree on
where a stop string cuts the text, on the text itself, or on each token's ``text_offset``.
Turning the result into OpenAI's response shapes is :mod:`cartridges.serving.responses`' job.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from cartridges.serving.jobs import Row, StreamToken


@dataclass
class Rendered:
    """Tokens ready to send: the ones kept, their text, their offsets, and why the choice ended.

    Streamed, it holds one token, and ``finish_reason`` is ``None`` but on its choice's last.

    Attributes:
        token_ids: the tokens kept (a stop string's token included, tokens after it dropped).
        text: the text they release (it may lag behind them while a stop string could begin).
        offsets: where each token's text begins in the choice's answer (OpenAI's
            ``text_offset``), clamped to the answer's end.
    """

    token_ids: list[int]
    text: str
    offsets: list[int]
    logprobs: list[float | None]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    finish_reason: str | None


class Detokenizer:
    """The text of a growing token sequence, one piece per token, in linear time.

    Each token is decoded in a short window after the text decoded so far, not with the whole
    sequence. The window starts one decoded piece back, so that tokenizers that treat a
    sequence's first token specially (e.g. a leading-space marker) decode the new tokens as they
    do inside the full text, and the pieces join to the full decode. A token that ends inside a
    UTF-8 character (U+FFFD) gives an empty piece until the character is complete.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.window = 0  # first id of the decoding window (one decoded piece back)
        self.decoded = 0  # ids decoded into pieces so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int, last: bool = False) -> str:
        """The text that ``token_id`` completes (all that is left when ``last``)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.window : self.decoded])
        after = self._decode(self.ids[self.window :])
        if after.endswith("\ufffd") and not last:
            return ""
        self.window, self.decoded = self.decoded, len(self.ids)
        return after[len(before) :] if after.startswith(before) else ""


class TextStream:
    """One choice's text, released as soon as no later token can change it.

    A tail that could begin a stop string waits until the string is ruled out (then it is
    released) or completed (then the text ends before it, and ``finish_reason`` is ``"stop"``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]) -> None:
        self.pieces, self.stops = Detokenizer(tokenizer), stops
        self.longest = max((len(stop) for stop in stops), default=0)
        self.text = ""  # the decoded text so far, an incomplete last character left out
        self.sent = 0  # characters of it released
        self.offset = 0  # where the last pushed token's text begins
        self.finish_reason: str | None = None

    def push(self, token: StreamToken) -> str:
        """Add the choice's next token; returns the text that can be released now."""
        piece = self.pieces.push(token.token_id, last=token.finish_reason is not None)
        start = max(0, len(self.text) - self.longest)
        self.offset = len(self.text)
        self.text += piece
        hits = [p for p in (self.text.find(stop, start) for stop in self.stops) if p >= 0]
        if hits:
            self.finish_reason = "stop"
            self.offset = min(self.offset, min(hits))
            return self._release(min(hits))
        if token.finish_reason is not None:
            self.finish_reason = token.finish_reason
            return self._release(len(self.text))
        return self._release(len(self.text) - self._stop_prefix())

    def _stop_prefix(self) -> int:
        """Length of the longest tail of the text that begins a stop string."""
        for size in range(min(self.longest - 1, len(self.text)), 0, -1):
            if any(stop.startswith(self.text[-size:]) for stop in self.stops):
                return size
        return 0

    def _release(self, end: int) -> str:
        piece, self.sent = self.text[self.sent : end], end
        return piece


def render(tokenizer: PreTrainedTokenizerBase, row: Row, stops: list[str]) -> Rendered:
    """A whole row as its stream would release it: stop strings applied, offsets per token."""
    stream, ids = TextStream(tokenizer, stops), row.token_ids
    ending = "stop" if row.stopped else "length"
    texts, offsets = [], []
    for i, token_id in enumerate(ids):
        finish_reason = ending if i == len(ids) - 1 else None
        texts.append(stream.push(StreamToken(0, token_id, finish_reason=finish_reason)))
        offsets.append(stream.offset)
        if stream.finish_reason is not None:
            break
    keep = len(texts)
    top_ids = row.top_ids.tolist() if row.top_ids is not None else []
    top_values = row.top_logprobs.tolist() if row.top_logprobs is not None else []
    return Rendered(
        token_ids=ids[:keep],
        text="".join(texts),
        offsets=[min(offset, stream.sent) for offset in offsets],
        logprobs=row.logprobs[:keep],
        top_ids=top_ids[:keep],
        top_logprobs=top_values[:keep],
        finish_reason=stream.finish_reason or ending,
    )
