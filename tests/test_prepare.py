"""The GPT-2 and own-text prepare scripts: exact token counts, usable output, one-line errors, no half files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptsmith import data as ds
from gptsmith import prepare as prepare_utils
from helpers import load_script

DOCS = [
    "The first document.\nIt has two lines, and some unicode: café, 日本語, 🙂.",
    "Second: short.",
    "   leading spaces and a trailing newline\n",
    "<|endoftext|> written inside a text is plain text, not the special token",
    "Fifth document, " * 40,
    "x",
]


@pytest.fixture(scope="module")
def enc(gpt2_bpe):
    return ds.gpt2_encoding()


@pytest.fixture(scope="module")
def owt(gpt2_bpe):
    """data/openwebtext/prepare.py, which loads GPT-2's tokenizer before anything else."""
    return load_script("data/openwebtext/prepare.py")


@pytest.fixture(scope="module")
def text_script():
    return load_script("data/text/prepare.py")


def tokens(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def documents(ids: np.ndarray, enc) -> list[str]:
    """Split a token stream at <|endoftext|> (each document ends with one) and decode the pieces."""
    ends = np.flatnonzero(ids == enc.eot_token)
    assert len(ends) and ends[-1] == len(ids) - 1
    return [enc.decode(piece[:-1].tolist()) for piece in np.split(ids, ends[:-1] + 1)]


def assert_one_error_line(capsys, contains: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert contains in err[0], err[0]


def assert_no_output(out: Path) -> None:
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], left  # neither train.bin/val.bin nor temporary files or caches


# --- data/openwebtext ---------------------------------------------------------------------------


def write_corpus(folder: Path, fmt: str, docs: list[str]) -> str:
    """The docs as .txt files (one per document), a .jsonl or a .parquet file; returns the --data_files glob."""
    folder.mkdir()
    if fmt == "txt":
        for i, doc in enumerate(docs):
            (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
        return str(folder / "*.txt")
    if fmt == "jsonl":
        half = len(docs) // 2  # two files, so the glob matters
        for name, part in (("a.jsonl", docs[:half]), ("b.jsonl", docs[half:])):
            lines = [json.dumps({"id": i, "text": d}, ensure_ascii=False) for i, d in enumerate(part)]
            (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(folder / "*.jsonl")
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), folder / "docs.parquet")
    return str(folder / "docs.parquet")


@pytest.mark.parametrize(("fmt", "num_proc"), [("txt", 1), ("jsonl", 1), ("parquet", 1), ("jsonl", 2)])
def test_openwebtext_local_files_exact_tokens(owt, enc, tmp_path, fmt, num_proc):
    pattern = write_corpus(tmp_path / "corpus", fmt, DOCS)
    out = tmp_path / "out"
    owt.main([f"--data_files={pattern}", f"--out_dir={out}", f"--num_proc={num_proc}", "--val_fraction=0.3"])
    train, val = tokens(out / "train.bin"), tokens(out / "val.bin")
    assert len(train) + len(val) == sum(len(enc.encode_ordinary(d)) + 1 for d in DOCS)
    assert (val == enc.eot_token).sum() == round(0.3 * len(DOCS))  # whole documents go to val
    assert sorted(documents(train, enc) + documents(val, enc)) == sorted(DOCS)
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "val.bin"]  # the arrow cache is gone


def test_openwebtext_text_field_and_seed(owt, enc, tmp_path):
    lines = [json.dumps({"body": d}) for d in DOCS]
    (tmp_path / "c.jsonl").write_text("\n".join(lines), encoding="utf-8")
    runs = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        out = tmp_path / name
        owt.main(
            [
                f"--data_files={tmp_path / 'c.jsonl'}",
                "--text_field=body",
                f"--out_dir={out}",
                "--num_proc=1",
                "--val_fraction=0.5",
                f"--seed={seed}",
            ]
        )
        runs.append(documents(tokens(out / "val.bin"), enc))
    assert runs[0] == runs[1] and len(runs[0]) == 3
    assert runs[0] != runs[2]  # the seed picks the val documents (6 choose 3: a clash is unlikely, and fixed)


def test_openwebtext_hub_failure_is_one_line(owt, tmp_path, capsys, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Skylion007/openwebtext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as exit_info:
        owt.main([f"--out_dir={tmp_path / 'out'}", "--num_proc=1"])
    assert exit_info.value.code == 2
    assert_one_error_line(capsys, "--data_files=GLOB")
    assert_no_output(tmp_path / "out")


def bad_corpus(tmp_path: Path, case: str) -> list[str]:
    """Files for one bad input, and the options that point at them."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = corpus / "good.jsonl"
    good.write_text('{"text": "one", "id": 1}\n{"text": "two", "id": 2}\n')
    files = {
        "missing": [f"--data_files={corpus / 'nope.jsonl'}"],
        "empty glob": [f"--data_files={corpus / '*.txt'}"],
        "empty file": [f"--data_files={corpus / '*.jsonl'}"],
        "blank corpus": [f"--data_files={corpus / 'blank.jsonl'}"],
        "one document": [f"--data_files={corpus / 'one.txt'}"],
        "unknown field": [f"--data_files={good}", "--text_field=body"],
        "not text": [f"--data_files={good}", "--text_field=id"],
        "utf8 txt": [f"--data_files={corpus / '*.txt'}"],
        "utf8 jsonl": [f"--data_files={corpus / 'bad.jsonl'}"],
        "bad json": [f"--data_files={corpus / 'bad.jsonl'}"],
        "unsupported": [f"--data_files={corpus / 'x.csv'}"],
        "val zero": [f"--data_files={good}", "--val_fraction=0"],
        "val one": [f"--data_files={good}", "--val_fraction=1.5"],
    }[case]
    if case == "empty file":
        (corpus / "empty.jsonl").write_bytes(b"")
    if case == "blank corpus":
        (corpus / "blank.jsonl").write_text("\n\n")
    if case == "one document":
        (corpus / "one.txt").write_text("a single file is a single document")
    if case == "utf8 txt":
        (corpus / "a.txt").write_text("fine")
        (corpus / "b.txt").write_bytes(b"bad \xff byte")
    if case == "utf8 jsonl":
        (corpus / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \xff"}\n')
    if case == "bad json":
        (corpus / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    if case == "unsupported":
        (corpus / "x.csv").write_text("text\nhello\n")
    return files


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "not found"),
        ("empty glob", "no files match"),
        ("empty file", "empty.jsonl is empty"),
        ("blank corpus", "holds no documents"),
        ("one document", "at least 2"),
        ("unknown field", "columns are: text, id"),
        ("not text", "not text"),
        ("utf8 txt", "b.txt is not valid UTF-8 text (byte 4)"),
        ("utf8 jsonl", "bad.jsonl is not valid UTF-8 text (byte 29)"),
        ("bad json", "JSON lines"),
        ("unsupported", "unsupported file type"),
        ("val zero", "val_fraction"),
        ("val one", "val_fraction"),
    ],
)
def test_openwebtext_bad_input_is_one_error_line(owt, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        owt.main([*bad_corpus(tmp_path, case), f"--out_dir={out}", "--num_proc=1"])
    assert exit_info.value.code == 2
    assert_one_error_line(capsys, message)
    assert_no_output(out)


def test_openwebtext_interrupted_write_leaves_no_train_bin(owt, tmp_path, capsys, monkeypatch):
    pattern = write_corpus(tmp_path / "corpus", "jsonl", DOCS)
    out = tmp_path / "out"
    monkeypatch.setattr(owt, "WRITE_BATCH", 2)  # several chunks, so the interruption falls midway
    real_write, calls = prepare_utils.TokenWriter.write, []

    def write_then_interrupt(self, split, ids):
        calls.append(split)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(self, split, ids)

    monkeypatch.setattr(prepare_utils.TokenWriter, "write", write_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        owt.main([f"--data_files={pattern}", f"--out_dir={out}", "--num_proc=1"])
    assert exit_info.value.code == 130
    assert_one_error_line(capsys, "interrupted")
    assert_no_output(out)


def test_token_writer_publishes_only_on_commit(tmp_path):
    with pytest.raises(RuntimeError), prepare_utils.TokenWriter(tmp_path) as writer:
        writer.write("train", [1, 2, 3])
        raise RuntimeError("disk gone")
    assert_no_output(tmp_path)
    with prepare_utils.TokenWriter(tmp_path) as writer:
        writer.write("train", np.array([1, 2, 3]))
        writer.write("val", [4])
        assert writer.commit() == {"train": 3, "val": 1}
    assert tokens(tmp_path / "train.bin").tolist() == [1, 2, 3]


# --- data/shakespeare ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shakespeare_gpt2(tmp_path_factory, shakespeare_path) -> Path:
    out = tmp_path_factory.mktemp("shakespeare")
    load_script("data/shakespeare/prepare.py").main([f"--input={shakespeare_path}", f"--out_dir={out}"])
    return out


def test_shakespeare_gpt2_matches_tiktoken(shakespeare_gpt2, shakespeare_path, enc):
    text = shakespeare_path.read_text(encoding="utf-8")
    n = int(0.9 * len(text))
    assert tokens(shakespeare_gpt2 / "train.bin").tolist() == enc.encode_ordinary(text[:n])
    assert tokens(shakespeare_gpt2 / "val.bin").tolist() == enc.encode_ordinary(text[n:])
    assert ds.load_meta(shakespeare_gpt2) is None  # GPT-2's vocabulary: no meta.pkl
    ds.open_split(shakespeare_gpt2, "val", "shakespeare", ds.GPT2_VOCAB_SIZE)


def test_shakespeare_without_tokenizer_files_is_one_line(play_path, tmp_path, capsys, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(SystemExit) as exit_info:
        load_script("data/shakespeare/prepare.py").main([f"--input={play_path}", f"--out_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert_one_error_line(capsys, "TIKTOKEN_CACHE_DIR")
    assert_no_output(tmp_path)


# --- data/text ----------------------------------------------------------------------------------


def test_text_char_is_a_usable_dataset(text_script, tmp_path):
    (tmp_path / "b.txt").write_text("second file, ends with a newline\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file: no newline at its end, ünïcödé " * 60, encoding="utf-8")
    out = tmp_path / "mine"
    text_script.main([f"--input={tmp_path / '*.txt'}", f"--out_dir={out}", "--val_fraction=0.2"])
    meta = ds.load_meta(out)
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == len(meta["stoi"]) == len(meta["itos"])
    train, val = (ds.open_split(out, s, str(out), meta["vocab_size"]) for s in ("train", "val"))
    encode, decode = ds.get_tokenizer(meta)
    # sorted order, and a newline between the files so lines do not run together
    expected = (tmp_path / "a.txt").read_text() + "\n" + (tmp_path / "b.txt").read_text()
    assert decode(np.concatenate([train, val]).tolist()) == expected
    assert encode(expected) == np.concatenate([train, val]).tolist()
    assert len(val) == round(0.2 * len(expected))


def test_text_gpt2_is_a_usable_dataset_and_drops_stale_meta(text_script, enc, tmp_path):
    (tmp_path / "a.txt").write_text("Hello there, GPT-2. " * 100, encoding="utf-8")
    (tmp_path / "b.txt").write_text("A second document.", encoding="utf-8")
    out = tmp_path / "mine"
    text_script.main([f"--input={tmp_path / 'a.txt'}", f"--out_dir={out}"])  # char first: writes meta.pkl
    assert (out / "meta.pkl").exists()
    text_script.main([f"--input={tmp_path / '*.txt'}", f"--out_dir={out}", "--tokenizer=gpt2"])
    assert ds.load_meta(out) is None  # else the GPT-2 ids would be read with the old character vocabulary
    train, val = (ds.open_split(out, s, str(out), ds.GPT2_VOCAB_SIZE) for s in ("train", "val"))
    ids = np.concatenate([train, val])
    assert len(ids) == sum(len(enc.encode_ordinary((tmp_path / f).read_text())) + 1 for f in ("a.txt", "b.txt"))
    encode, decode = ds.get_tokenizer(None)
    text = (tmp_path / "a.txt").read_text() + "<|endoftext|>" + (tmp_path / "b.txt").read_text() + "<|endoftext|>"
    assert decode(ids.tolist()) == text and encode(text) == ids.tolist()


def test_text_default_location_is_data_name(text_script, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(text_script, "DATA_ROOT", tmp_path / "data")
    (tmp_path / "in.txt").write_text("some text of my own, " * 100)
    text_script.main([f"--input={tmp_path / 'in.txt'}", "--name=mine"])
    assert sorted(p.name for p in (tmp_path / "data" / "mine").iterdir()) == ["meta.pkl", "train.bin", "val.bin"]
    captured = capsys.readouterr()
    assert "python train.py config/shakespeare_char.py --dataset=mine --out_dir=out-mine" in captured.out
    assert "warning: val.bin gets only" in captured.err  # 210 val tokens are fewer than a 1024 block


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name=a/b"], "no path separators"),
        (["--name=.."], "no path separators"),
        (["--name=text"], "built-in dataset"),
        ([], "pass --name=NAME"),
        (["--name=x", "--tokenizer=bpe"], "tokenizer must be char or gpt2"),
        (["--name=x", "--val_fraction=1"], "val_fraction"),
        (["--name=x", "--input=missing.txt"], "not found"),
        (["--name=x", "--input=*.nothing"], "no files match"),
        (["--name=x", "--input=empty.txt"], "empty.txt is empty"),
        (["--name=x", "--input=bad.txt"], "bad.txt is not valid UTF-8 text (byte 2)"),
        (["--name=x", "--input=short.txt"], "too few to split"),
    ],
)
def test_text_bad_input_is_one_error_line(text_script, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(text_script, "DATA_ROOT", tmp_path / "data")
    (tmp_path / "data" / "text").mkdir(parents=True)
    (tmp_path / "data" / "text" / "prepare.py").write_text("")
    monkeypatch.chdir(tmp_path)
    Path("good.txt").write_text("plenty of good text " * 50)
    Path("empty.txt").write_text("")
    Path("bad.txt").write_bytes(b"ok\xc3(")
    Path("short.txt").write_text("abc")
    if not any(a.startswith("--input=") for a in args):
        args = ["--input=good.txt", *args]
    with pytest.raises(SystemExit) as exit_info:
        text_script.main(args)
    assert exit_info.value.code == 2
    assert_one_error_line(capsys, message)
    assert not list((tmp_path / "data").glob("*/*.bin"))
