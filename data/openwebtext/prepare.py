"""OpenWebText, or your own corpus of documents, as GPT-2 BPE tokens: train.bin / val.bin (uint16).

    python data/openwebtext/prepare.py [--data_files=GLOB] [--text_field=text] [--out_dir=DIR]
                                       [--num_proc=N] [--val_fraction=0.0005] [--seed=2357]

Without --data_files it loads OpenWebText from the Hugging Face hub (as nanoGPT does: about 54 GB
of download cache, ~9B tokens). With --data_files it reads local .txt, .jsonl/.json or .parquet
files instead; a .txt file is one document (a whole file per document), jsonl/json/parquet rows are
documents with their text in --text_field. Each document becomes its GPT-2 tokens followed by
<|endoftext|> (50256). A random val_fraction of the documents (at least one, chosen by --seed) goes
to val.bin, the rest to train.bin in their original order.

Tokens go through datasets' arrow cache in a temporary folder inside out_dir (deleted at the end)
and are written in chunks, so memory stays flat however big the corpus is.
"""

# no `from __future__ import annotations`: tests import this file unregistered in sys.modules, where
# dataclasses cannot resolve string annotations
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptsmith.configurator import UserError, cli_errors, load_config, opt, show_progress
from gptsmith.prepare import (
    TokenWriter,
    check_utf8,
    encode_documents,
    expand_inputs,
    gpt2,
)

HUB_DATASET = "Skylion007/openwebtext"  # what nanoGPT's load_dataset("openwebtext") resolves to
BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
}
WRITE_BATCH = 1024  # documents read back from the arrow cache at a time


@dataclass
class OpenWebTextConfig:
    """Tokenize OpenWebText (or local documents) with GPT-2 BPE into train.bin / val.bin."""

    data_files: str = opt("", "local .txt/.jsonl/.json/.parquet files, a glob (default: OpenWebText from the hub)")
    text_field: str = opt("text", "the column holding each document's text (jsonl/json/parquet)")
    out_dir: str = opt("", "where train.bin and val.bin go (default: this script's folder)")
    num_proc: int = opt(min(8, os.cpu_count() or 1), "processes that tokenize")
    val_fraction: float = opt(0.0005, "the fraction of documents that go to val.bin, in (0, 1)")
    seed: int = opt(2357, "picks the val documents")
    hub_dataset: str = opt(HUB_DATASET, "the Hugging Face hub dataset to load when --data_files is not given")


def prepare(cfg: OpenWebTextConfig, out_dir: Path) -> dict[str, int]:
    """Load, tokenize and write the corpus; return token counts per split."""
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {cfg.val_fraction}")
    if cfg.num_proc < 1:
        raise UserError(f"num_proc must be at least 1, got {cfg.num_proc}")
    files = _local_files(cfg.data_files) if cfg.data_files else None
    gpt2()  # fail on a missing tokenizer now, not inside a worker process
    _quiet_datasets()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix=".prepare-cache-", dir=out_dir))
    try:
        docs = _load_documents(cfg, files, cache)
        tokens = _tokenize(docs, cfg, cache)
        return _write(tokens, cfg, out_dir)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _local_files(pattern: str) -> list[Path]:
    files = expand_inputs(pattern)
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        odd = next(f for f in files if f.suffix.lower() not in BUILDERS)
        raise UserError(f"{odd}: unsupported file type; use {', '.join(BUILDERS)}")
    if len(kinds) > 1:
        raise UserError(f"{pattern} mixes file types ({', '.join(sorted(kinds))}); prepare one type at a time")
    if kinds != {"parquet"}:  # parquet strings are UTF-8 by construction
        for f in files:
            check_utf8(f)  # here, with the file and byte, rather than as an error deep inside datasets
    return files


def _quiet_datasets() -> None:
    import datasets

    # datasets and huggingface_hub log retries, notices and errors; the one error line we print says what matters
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if show_progress():
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()


def _load_documents(cfg: OpenWebTextConfig, files: list[Path] | None, cache: Path) -> Any:
    import datasets

    if files is None:
        print(f"loading {cfg.hub_dataset} from the Hugging Face hub (offline? pass --data_files=GLOB)")
        try:
            docs = datasets.load_dataset(cfg.hub_dataset, split="train", num_proc=cfg.num_proc)
        except Exception as e:  # no network, a renamed dataset, a broken download: many exception types
            raise UserError(
                f"cannot load {cfg.hub_dataset} from the Hugging Face hub ({_root_cause(e)}); "
                "to use local files instead, pass --data_files=GLOB (.txt, .jsonl or .parquet)"
            ) from None
    else:
        builder = BUILDERS[files[0].suffix.lower()]
        # one document per .txt file: users with their own corpora mean files, not lines, as documents
        extra = {"sample_by": "document"} if builder == "text" else {}
        size = sum(f.stat().st_size for f in files)
        print(f"loading {len(files)} {builder} file(s), {size / 1e6:,.1f} MB")
        try:
            docs = datasets.load_dataset(
                builder,
                data_files=[str(f) for f in files],
                split="train",
                cache_dir=str(cache),  # not ~/.cache: this copy of the corpus is deleted at the end
                # one process: converting to arrow is fast next to tokenizing, and a worker's error would
                # reach us only as a traceback's text
                **extra,
            )
        except Exception as e:  # datasets wraps parse errors in its own types, or not at all
            if "corresponds to no data" in str(e):  # what datasets says when the files hold no rows
                raise UserError(f"{cfg.data_files} holds no documents") from None
            what = "JSON lines (one object per line)" if builder == "json" else builder
            raise UserError(f"cannot read {cfg.data_files} as {what}: {_root_cause(e)}") from None
    return _check_documents(docs, cfg.text_field, cfg.data_files or cfg.hub_dataset)


def _check_documents(docs: Any, text_field: str, where: str) -> Any:
    if text_field not in docs.column_names:
        columns = ", ".join(docs.column_names) or "none"
        raise UserError(f"{where} has no column '{text_field}'; its columns are: {columns} (pass --text_field=NAME)")
    dtype = getattr(docs.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise UserError(f"column '{text_field}' of {where} holds {docs.features[text_field]}, not text")
    if len(docs) < 2:
        raise UserError(
            f"{where} holds {len(docs)} document(s); train and val need at least 2 "
            "(a .txt file is one document: for a single text use data/text/prepare.py)"
        )
    return docs


def _root_cause(e: BaseException) -> str:
    """The innermost exception of a chain, as one line of at most 300 characters; Ctrl-C stays Ctrl-C."""
    chain = [e]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
        chain.append(inner)
    if any(isinstance(x, KeyboardInterrupt) for x in chain):  # datasets wraps a worker's interruption
        raise KeyboardInterrupt
    # a worker process's failure ends in a RemoteTraceback: the text of a whole traceback, not a message
    e = [x for x in chain if type(x).__name__ != "RemoteTraceback"][-1]
    if isinstance(e, UnicodeDecodeError):
        return "not valid UTF-8 text"
    message = " ".join(str(e).split())  # some messages span lines (datasets' CastError lists schemas)
    message = message if len(message) <= 300 else message[:297] + "..."
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def _tokenize(docs: Any, cfg: OpenWebTextConfig, cache: Path) -> Any:
    import datasets

    features = datasets.Features({"ids": datasets.List(datasets.Value("uint16"))})
    try:
        return docs.map(
            encode_documents,
            batched=True,
            fn_kwargs={"text_field": cfg.text_field},
            remove_columns=docs.column_names,
            features=features,
            num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
            cache_file_name=str(cache / "tokens.arrow"),  # with the other temporary files, whatever the source
            desc="tokenizing",
        )
    except Exception as e:  # a worker's failure arrives wrapped by datasets and multiprocess
        raise UserError(f"tokenizing failed: {_root_cause(e)}") from None


def _write(tokens: Any, cfg: OpenWebTextConfig, out_dir: Path) -> dict[str, int]:
    n_docs = len(tokens)
    n_val = min(max(1, round(n_docs * cfg.val_fraction)), n_docs - 1)
    is_val = np.zeros(n_docs, dtype=bool)  # one byte per document, not per token
    is_val[np.random.default_rng(cfg.seed).choice(n_docs, size=n_val, replace=False)] = True
    print(f"{n_docs:,} documents: {n_docs - n_val:,} train, {n_val:,} val")
    start = 0
    with (
        TokenWriter(out_dir) as writer,
        tqdm(total=n_docs, unit="doc", desc="writing", disable=not show_progress()) as bar,
    ):
        # arrow batches are views of the memory-mapped cache: only one batch is in memory at a time
        for table in tokens.with_format("arrow").iter(batch_size=WRITE_BATCH):
            ids = table.column("ids").combine_chunks()
            flat = ids.flatten().to_numpy(zero_copy_only=False)
            val_docs = is_val[start : start + len(table)]
            start += len(table)
            if val_docs.any():
                val_tokens = np.repeat(val_docs, ids.value_lengths().to_numpy(zero_copy_only=False))
                writer.write("val", flat[val_tokens])
                writer.write("train", flat[~val_tokens])
            else:
                writer.write("train", flat)
            bar.update(len(table))
        return writer.commit(None)


@contextmanager
def _clean_interrupts() -> Iterator[None]:
    """Ctrl-C and SIGTERM (`kill`, a scheduler's time limit) stop the run as KeyboardInterrupt in this process,
    so the temporary files get deleted, and quietly in forked tokenizing workers."""
    main_pid = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        if signum == signal.SIGTERM:  # how the pool stops its workers once the main process gives up
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        # Ctrl-C reaches every process of the terminal's group: workers leave the stopping to the main process,
        # rather than each printing a traceback

    signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job (`cmd &`) keeps ignoring Ctrl-C
        signals.append(signal.SIGINT)
    previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> None:
    with cli_errors(), _clean_interrupts():
        cfg = load_config(OpenWebTextConfig, argv)
        prepare(cfg, Path(cfg.out_dir) if cfg.out_dir else Path(__file__).parent)


if __name__ == "__main__":
    main()
