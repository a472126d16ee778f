"""Benchmark document_prep: a generated multi-format corpus through the three nodes.

Writes ``--mb`` megabytes of documents (.txt .md .jsonl .html .tex .pdf, in subfolders) to a
temporary folder, then runs ``load_documents``, ``chunk_documents`` and ``summarise_corpus``
with the configured model's tokenizer, as ``kedro run --pipelines document_prep`` does. Prints
throughput and memory, and as its last line one JSON object with the headline figures.

Memory: inputs are read one at a time and texts move to Arrow as they come, so peak RSS should
grow with the corpus only by the corpus table (the clean text) itself. Each of two sizes (half,
full) runs in a fresh process; the marginal RSS per MB of table between them should be ~1.

The same bytes of plain text are also read as one file and as 50 KB files (each in a fresh
process): the ratio of their peak RSS should stay near 1 (target <= 1.2).

    python benchmarks/document_prep.py [--mb 50] [--model data/06_models/tiny_llama]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("benchmark")
# Share of the corpus bytes per format; PDFs are few, as text extraction from them is slow.
MIX = {"txt": 0.33, "md": 0.25, "jsonl": 0.15, "html": 0.15, "tex": 0.1, "pdf": 0.02}
FILE_BYTES = 100_000


# ---------------------------------------------------------------------------- corpus generation


def _vocabulary() -> list[str]:
    """Words of the bundled example corpus: text the embedded model's tokenizer was built on."""
    text = " ".join(p.read_text() for p in sorted((ROOT / "data/01_raw/corpus").glob("*.*")))
    return sorted(set(re.findall(r"[A-Za-z]{2,}", text)))


def _paragraphs(rng: random.Random, words: list[str], n_bytes: int) -> list[str]:
    zipf = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))
    paragraphs, size = [], 0
    while size < n_bytes:
        sentences = [
            " ".join(rng.choices(words, cum_weights=zipf, k=rng.randint(6, 20))).capitalize() + "."
            for _ in range(rng.randint(3, 8))
        ]
        paragraphs.append(" ".join(sentences))
        size += len(paragraphs[-1]) + 2
    return paragraphs


def _pdf(pages: list[str]) -> bytes:
    """A minimal PDF with one Helvetica text line per 90 characters."""
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (b" ".join(b"%d 0 R" % p for p in page_ids), len(pages)),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for page_id, text in zip(page_ids, pages, strict=True):
        lines = [text[i : i + 90] for i in range(0, len(text), 90)]
        ops = b"BT /F1 9 Tf 11 TL 36 760 Td " + b" ".join(
            b"(%s) Tj T*" % ln.encode() for ln in lines
        )
        ops += b" ET"
        objects[page_id] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (page_id + 1)
        )
        objects[page_id + 1] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(ops), ops)
    out, offsets = bytearray(b"%PDF-1.4\n"), {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref, size = len(out), max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


def _render(kind: str, index: int, paragraphs: list[str]) -> bytes:
    title = f"Document {index}"
    if kind == "txt":
        return (title + "\n\n" + "\n\n".join(paragraphs)).encode()
    if kind == "md":
        parts = [f"# {title}"]
        for i, paragraph in enumerate(paragraphs):
            if i % 4 == 0:
                parts.append(f"## Section {i // 4 + 1}")
            parts.append(paragraph)
        return "\n\n".join(parts).encode()
    if kind == "jsonl":
        records = ({"title": title, "id": i, "text": p} for i, p in enumerate(paragraphs))
        return "\n".join(json.dumps(r) for r in records).encode()
    if kind == "html":
        body = "\n".join(f"<h2>Part {i}</h2><p>{p}</p>" for i, p in enumerate(paragraphs))
        return (
            f"<html><head><title>{title}</title><style>p {{margin: 0}}</style></head><body>"
            f"<nav><a href='/'>Home</a></nav><script>track({index})</script>{body}</body></html>"
        ).encode()
    if kind == "tex":
        body = "\n\n".join(
            f"% note {i}\n\\section{{Part {i}}}\n{p}" for i, p in enumerate(paragraphs)
        )
        return f"\\title{{{title}}}\n{body}\n".encode()
    pages = ["\n".join(paragraphs[i : i + 3]) for i in range(0, len(paragraphs), 3)]
    return _pdf(pages)


# How the bytes are laid out: the mixed formats, or plain text as one file or many small ones.
LAYOUTS = {
    "mixed": (MIX, FILE_BYTES),
    "one_file": ({"txt": 1.0}, None),  # a single file holds everything
    "small_files": ({"txt": 1.0}, 50_000),
}


def generate_corpus(
    root: Path, total_bytes: int, seed: int = 0, layout: str = "mixed"
) -> tuple[int, int]:
    """Write the corpus file by file; returns ``(files, bytes)``."""
    rng = random.Random(seed)
    words = _vocabulary()
    rng.shuffle(words)
    mix, file_bytes = LAYOUTS[layout]
    files = written = 0
    for kind, share in mix.items():
        target = share * total_bytes
        kind_bytes = 0
        while kind_bytes < target:
            folder = root / kind / f"part{files % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            raw = _render(kind, files, _paragraphs(rng, words, file_bytes or int(target)))
            (folder / f"doc{files:05d}.{kind}").write_bytes(raw)
            kind_bytes += len(raw)
            files += 1
        written += kind_bytes
    return files, written


# ---------------------------------------------------------------------------- measurement


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(args: argparse.Namespace) -> dict:
    """Generate ``args.mb`` of documents and run the three nodes on them, in this process."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("cartridges.corpus").setLevel(logging.ERROR)

    from cartridges.modeling import load_tokenizer
    from cartridges.pipelines.document_prep.nodes import (
        chunk_documents,
        load_documents,
        summarise_corpus,
    )

    model = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())["model"]
    model["name_or_path"] = args.model or str(ROOT / model["name_or_path"])
    params = yaml.safe_load((ROOT / "conf/base/parameters_document_prep.yml").read_text())
    params = params["document_prep"]
    params["chunking"] |= {
        "method": args.method,
        "num_chunks": args.chunks,
        "min_tokens": 512,  # the paper's sizes
        "max_tokens": 1024,
    }

    with tempfile.TemporaryDirectory(prefix="document_prep_bench_") as tmp:
        started = time.perf_counter()
        if args.corpus_dir:  # generated by the parent, so that its memory is not counted here
            params["corpus_dir"] = args.corpus_dir
            paths = [p for p in Path(args.corpus_dir).rglob("*") if p.is_file()]
            files, total = len(paths), sum(p.stat().st_size for p in paths)
        else:
            files, total = generate_corpus(Path(tmp), int(args.mb * 1e6), layout=args.layout)
            params["corpus_dir"] = tmp
        generate_s = time.perf_counter() - started
        load_tokenizer(model["name_or_path"])  # imports and tokenizer in the baseline
        baseline = _peak_rss_mb()

        started = time.perf_counter()
        corpus, skipped = load_documents(params, model)
        load_s = time.perf_counter() - started
        chunk_set = chunk_documents(corpus, params, model)
        chunk_s = time.perf_counter() - started - load_s
        report, _ = summarise_corpus(corpus, skipped, chunk_set)
        total_s = time.perf_counter() - started
        peak = _peak_rss_mb()

    table_mb = corpus.memory_usage(deep=True).sum() / 1e6
    mb = total / 1e6
    result = {
        "benchmark": "document_prep",
        "corpus_mb": round(mb, 1),
        "files": files,
        "documents": report["num_documents"],
        "skipped": report["num_skipped"],
        "tokens": report["total_tokens"],
        "chunks": report["num_chunks"],
        "seconds": round(total_s, 2),
        "mb_per_s": round(mb / total_s, 2),
        "load_mb_per_s": round(mb / load_s, 2),
        "chunk_s": round(chunk_s, 2),
        "peak_rss_mb": round(peak, 1),
        "rss_growth_mb": round(peak - baseline, 1),
        "corpus_table_mb": round(table_mb, 1),
    }
    logger.info(
        f"{files} files, {mb:.1f} MB (generated in {generate_s:.1f} s) -> "
        f"{report['num_documents']} documents, {report['total_tokens']:,} tokens, "
        f"{report['num_chunks']} chunks in {total_s:.1f} s: {result['mb_per_s']} MB/s "
        f"(loading {result['load_mb_per_s']} MB/s, chunking {chunk_s:.1f} s)\n"
        f"peak RSS {peak:.0f} MB, {peak - baseline:.0f} MB over the {baseline:.0f} MB baseline; "
        f"corpus table {table_mb:.0f} MB"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=50, help="corpus size to generate, in MB")
    parser.add_argument("--model", default=None, help="tokenizer; default: conf/base model")
    parser.add_argument("--chunks", type=int, default=256, help="token windows to draw")
    parser.add_argument("--method", default="token_windows", help="or structural")
    parser.add_argument("--single", action="store_true", help="one size, in this process")
    parser.add_argument("--layout", default="mixed", choices=sorted(LAYOUTS), help="(--single)")
    parser.add_argument("--corpus-dir", default=None, help="(--single) read it, generate none")
    args = parser.parse_args()
    if args.single:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        print(json.dumps(measure(args)))  # noqa: T201
        return

    def run(mb: float, layout: str = "mixed") -> dict:
        """One measurement in a fresh process (peak RSS only grows within a process), on a
        corpus generated here."""
        with tempfile.TemporaryDirectory(prefix="document_prep_bench_") as corpus:
            generate_corpus(Path(corpus), int(mb * 1e6), layout=layout)
            command = [sys.executable, __file__, "--single", "--mb", str(mb), "--chunks"]
            command += [str(args.chunks), "--method", args.method, "--corpus-dir", corpus]
            command += ["--model", args.model] if args.model else []
            output = subprocess.run(command, check=True, capture_output=True, text=True)
        sys.stderr.write(output.stderr[-2000:])
        return json.loads(output.stdout.strip().splitlines()[-1])

    half, full = run(args.mb / 2), run(args.mb)
    # The same bytes of plain text as one file and as files of 50 KB: a single large document
    # must not cost more memory than many small ones.
    one, many = run(args.mb, "one_file"), run(args.mb, "small_files")
    full["one_file_vs_small_files_peak_rss"] = round(one["peak_rss_mb"] / many["peak_rss_mb"], 2)
    full["one_file_peak_rss_mb"] = one["peak_rss_mb"]
    full["small_files_peak_rss_mb"] = many["peak_rss_mb"]
    logger.info(
        "%.0f MB of text as one file: peak RSS %.0f MB (%.1f s); as %d files of 50 KB: %.0f MB "
        "(%.1f s); ratio %.2f",
        args.mb,
        one["peak_rss_mb"],
        one["seconds"],
        many["files"],
        many["peak_rss_mb"],
        many["seconds"],
        full["one_file_vs_small_files_peak_rss"],
    )
    excess = {
        r["corpus_mb"]: round(r["rss_growth_mb"] - r["corpus_table_mb"], 1) for r in (half, full)
    }
    full["rss_over_table_mb_by_corpus_mb"] = excess
    # Memory added per MB of corpus table as the corpus doubles: 1.0 means only the table grows.
    full["marginal_rss_per_table_mb"] = round(
        (full["rss_growth_mb"] - half["rss_growth_mb"])
        / (full["corpus_table_mb"] - half["corpus_table_mb"]),
        2,
    )
    logger.info(
        "RSS over the table: %s MB at %s MB of corpus; marginal RSS per MB of table: %.2f",
        list(excess.values()),
        list(excess),
        full["marginal_rss_per_table_mb"],
    )
    print(json.dumps(full))  # noqa: T201


if __name__ == "__main__":
    main()
