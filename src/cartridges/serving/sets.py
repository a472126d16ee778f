"""Named libraries of document cartridges that a request selects from per question.

A set is a folder of one cartridge per document (``document_cartridges``, the output of
``distill_training.document_compression``) and the corpus those documents came from. A request
asks for ``{"set": "team", "select": 2}``; the set's retriever (:mod:`cartridges.routing`, BM25
by default) scores each document for the request's question and the best ``select`` cartridges
are composed in the set's order, so the same choice always gives the same KV. Members are
cartridge ids of their own, ``<set>:<document>``, which ``/v1/models`` lists.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cartridges.corpus import CorpusConfig, document_name, load_corpus, require_documents
from cartridges.routing import Retriever, make_retriever, select
from cartridges.serving.config import CartridgeSetConfig

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
SEPARATOR = ":"
"""Between a set's name and a member's document in a member's id (``team:manual``)."""


class CartridgeSet:
    """A set's members (document name -> cartridge file, in the set's order) and its retriever."""

    def __init__(
        self, name: str, files: dict[str, Path], retriever: Retriever, default_select: int
    ) -> None:
        self.name = name
        self.files = files
        self.retriever = retriever
        self.default_select = default_select

    @classmethod
    def open(cls, name: str, config: CartridgeSetConfig) -> CartridgeSet:
        """The set ``name`` as ``config`` describes it; a clear error for what does not fit.

        Raises:
            ValueError: no cartridge in the folder, or a cartridge whose document is not in the
                corpus.
        """
        if not name or SEPARATOR in name or "/" in name or "@" in name:
            raise ValueError(
                f"serving.cartridge_sets: set name {name!r} must be non-empty, without "
                f"'{SEPARATOR}', '/' or '@'."
            )
        folder = _cartridge_folder(Path(config.cartridges))
        files = {p.stem: p for p in sorted(folder.glob(f"*{SUFFIX}"))}
        if not files:
            raise ValueError(
                f"serving.cartridge_sets.{name}: no '*{SUFFIX}' cartridge in {folder} (train "
                "document cartridges with distill_training.document_compression)."
            )
        documents, _ = load_corpus(CorpusConfig(corpus_dir=config.corpus_dir))
        texts = {document_name(d.source): d.text for d in documents}
        require_documents(
            files, texts, f"serving.cartridge_sets.{name}: the cartridges", config.corpus_dir
        )
        retriever = make_retriever(
            config.retriever, [texts[d] for d in files], **config.retriever_options
        )
        logger.info("Cartridge set '%s': %d documents from %s", name, len(files), folder)
        return cls(name, files, retriever, config.select)

    def member_id(self, document: str) -> str:
        return f"{self.name}{SEPARATOR}{document}"

    def select(self, query: str, count: int | None = None) -> list[str]:
        """The ids of the ``count`` members best for ``query``, in the set's order."""
        count = min(count or self.default_select, len(self.files))
        chosen = select(self.retriever.scores(query), list(self.files), count)
        return [self.member_id(document) for document in chosen]


def _cartridge_folder(path: Path) -> Path:
    """``path`` itself if it holds cartridges, else its latest complete version's folder
    (``<filepath>/<version>/<name>/``, as a versioned set dataset saves them)."""
    if not path.is_dir():
        raise ValueError(f"Cartridge set folder {path} does not exist.")
    if any(path.glob(f"*{SUFFIX}")):
        return path
    versions = sorted(
        (v / path.name for v in path.iterdir() if (v / path.name).is_dir()),
        reverse=True,
    )
    if not versions:
        raise ValueError(
            f"Cartridge set folder {path} holds no cartridge and no saved version of a set."
        )
    return versions[0]
