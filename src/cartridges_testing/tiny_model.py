"""A tiny Llama-architecture model with its own tokenizer, built offline and deterministically.

It stands in for a real LLM in tests and on machines with no hub access: the code paths are
exactly those a 1B-8B model takes, only the sizes differ. Its weights are random, so it cannot
answer questions; the toy-world model (``cartridges.toy_world``) is the one trained to read.

Run ``python -m cartridges_testing.tiny_model OUTPUT_DIR`` to build it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Every message is "<|role|>content<|eos|>"; the assistant's end token is the tokenizer's eos so
# that generation stops there. The bos token opens the sequence and serves as attention sink.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_BUILTIN_TEXT = (
    "Cartridges are small key and value caches trained offline so that a language model can "
    "answer questions about a long corpus without reading it again. Questions, answers, "
    "summaries, records, dates, names and numbers 0 1 2 3 4 5 6 7 8 9."
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic for the same texts)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_BUILTIN_TEXT, *texts], trainer=trainer)
    bos = tokenizer.token_to_id("<|bos|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
    )


def build_model(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised Llama with 2 layers, GQA and tied embeddings (~0.1M parameters)."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def build(output_dir: str | Path, texts: Iterable[str] = (), seed: int = 0) -> Path:
    """Build tokenizer and model and save both to ``output_dir``."""
    tokenizer = build_tokenizer(texts)
    model = build_model(len(tokenizer), seed=seed)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    logger.info("Saved tiny model (%d-token vocabulary) to %s", len(tokenizer), output_dir)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="directory to write the model and tokenizer to")
    parser.add_argument(
        "--corpus", nargs="*", default=[], help="text files to train the tokenizer on"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    texts = [Path(path).read_text(encoding="utf-8") for path in args.corpus]
    build(args.output_dir, texts, seed=args.seed)


if __name__ == "__main__":
    main()
