# -*- coding: utf-8 -*-
"""Training data for ``spla train``: read local files, tokenize, pack into fixed-length sequences.

Pipeline:

1. :func:`discover_files` expands the ``--data`` paths (files or folders, recursively) into the supported
   files: ``.txt`` / ``.md`` (one document per file, UTF-8), ``.jsonl`` (one document per line, a JSON object
   with a string field, ``text`` by default) and ``.parquet`` (one document per row of that column; needs
   pyarrow).
2. :func:`build_corpus` tokenizes every document once (the model's tokenizer, its special tokens, plus EOS at
   the end of each document) into one flat ``uint32`` token array with document offsets, optionally cached on
   disk. Problems never vanish silently: each bad file gets one warning with counts (empty, not UTF-8,
   invalid JSON lines, lines without the text field, documents shorter than the minimum), and
   :class:`DataError` is raised when nothing usable is left.
3. :class:`PackedStream` turns the corpus into an endless, deterministic stream of sequences of exactly
   ``seq_len`` tokens. Documents are shuffled per epoch (seeded), laid end to end and cut at sequence
   borders; **position ids restart at 0 at every document start and at every sequence start**, so a packed
   row (or several rows concatenated into one ``B == 1`` batch) gives ``SPLAAttention`` the document
   boundaries as ``cu_seqlens``: documents never attend to each other, and SPLA blocks restart with each
   document. Labels are the next token inside the same document, ``-100`` across a boundary.
   A fraction ``synthetic_ratio`` of the sequences is replaced by built-in long-context retrieval examples
   (:class:`SyntheticTask`: a pass key or a key-value pair hidden in filler, asked for at the end).
   The stream's position is a small dict (:meth:`PackedStream.state_dict`), saved in checkpoints, so a
   resumed run reads exactly the sequences an uninterrupted run would have read.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

TEXT_EXTS = (".txt", ".md")
JSONL_EXTS = (".jsonl",)
PARQUET_EXTS = (".parquet",)
SUPPORTED_EXTS = TEXT_EXTS + JSONL_EXTS + PARQUET_EXTS
IGNORE_INDEX = -100


class DataError(ValueError):
    """No usable training data, or a data option that cannot work (the message says why)."""


class DataWarning(UserWarning):
    """A data file (or part of one) that was skipped; the message names the file and the counts."""


# ---------------------------------------------------------------------------------------------- files
def discover_files(paths: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Supported files under ``paths`` (sorted, de-duplicated) and the files of other types that were ignored.

    Raises:
        DataError: a path that does not exist, or a file given explicitly with an unsupported extension.
    """
    files: List[str] = []
    ignored: List[str] = []
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"--data path {p!r} does not exist")
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for n in sorted(names):
                    if n.startswith("."):
                        continue
                    fp = os.path.join(root, n)
                    (files if n.lower().endswith(SUPPORTED_EXTS) else ignored).append(fp)
        else:
            if not p.lower().endswith(SUPPORTED_EXTS):
                raise DataError(f"--data file {p!r} has an unsupported type; supported: {', '.join(SUPPORTED_EXTS)} "
                                f"(or a folder holding such files)")
            files.append(p)
    seen, out = set(), []
    for f in files:
        a = os.path.abspath(f)
        if a not in seen:
            seen.add(a)
            out.append(f)
    return out, ignored


@dataclass
class FileReport:
    """What reading one file gave: documents kept and the reasons for everything skipped."""
    path: str
    docs: int = 0
    tokens: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    fatal: Optional[str] = None  # the whole file was unusable

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def message(self) -> Optional[str]:
        if self.fatal:
            return f"{self.path}: skipped ({self.fatal})"
        if not self.skipped:
            return None
        parts = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        total = self.docs + sum(self.skipped.values())
        return f"{self.path}: {sum(self.skipped.values())} of {total} documents skipped ({parts}); {self.docs} kept"


def _read_text(path: str, report: FileReport) -> Iterator[str]:
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        report.fatal = "empty file"
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.fatal = f"not valid UTF-8 text: {e.reason} at byte {e.start}"
        return
    yield text


def _read_jsonl(path: str, text_field: str, report: FileReport) -> Iterator[str]:
    with open(path, "rb") as f:
        raw_lines = f.read().splitlines()
    if not any(line.strip() for line in raw_lines):
        report.fatal = "empty file"
        return
    for raw in raw_lines:
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            report.skip("lines not valid UTF-8")
            continue
        except json.JSONDecodeError:
            report.skip("lines not valid JSON")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            report.skip(f"lines without a string field {text_field!r}")
            continue
        if not obj[text_field].strip():
            report.skip(f"lines with an empty {text_field!r}")
            continue
        yield obj[text_field]


def _read_parquet(path: str, text_field: str, report: FileReport) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        report.fatal = f"not a readable parquet file: {e}"
        return
    if text_field not in pf.schema_arrow.names:
        report.fatal = f"no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})"
        return
    if pf.metadata.num_rows == 0:
        report.fatal = "empty file (0 rows)"
        return
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                report.skip(f"rows whose {text_field!r} is not a string")
            elif not value.strip():
                report.skip(f"rows with an empty {text_field!r}")
            else:
                yield value


def read_documents(path: str, text_field: str, report: FileReport) -> Iterator[str]:
    """The documents (strings) of one supported file; problems go to ``report``."""
    low = path.lower()
    if low.endswith(TEXT_EXTS):
        return _read_text(path, report)
    if low.endswith(JSONL_EXTS):
        return _read_jsonl(path, text_field, report)
    return _read_parquet(path, text_field, report)


# ---------------------------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """All usable documents, tokenized: ``tokens[offsets[i]:offsets[i+1]]`` is document ``i``."""
    tokens: np.ndarray   # uint32 [N]
    offsets: np.ndarray  # int64 [D + 1]
    reports: List[FileReport] = field(default_factory=list)

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1]) if len(self.offsets) else 0

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def _tokenizer_fingerprint(tokenizer) -> str:
    parts = [type(tokenizer).__name__, str(len(tokenizer)),
             str(getattr(tokenizer, "eos_token_id", None)), str(getattr(tokenizer, "bos_token_id", None))]
    try:
        parts.append(hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest())
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: the other parts still identify it
        pass
    return "|".join(parts)


def corpus_key(files: Sequence[str], tokenizer, text_field: str, min_doc_tokens: int, add_eos: bool) -> str:
    """A hash of everything the tokenized corpus depends on (file names, sizes, mtimes, tokenizer, options)."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{_tokenizer_fingerprint(tokenizer)}|{text_field}|{min_doc_tokens}|{add_eos}".encode())
    return h.hexdigest()[:20]


def tokenize_documents(tokenizer, texts: List[str], add_eos: bool) -> List[List[int]]:
    """Token ids of each text with the tokenizer's special tokens, plus EOS at the end (when it has one)."""
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None:
        out = [ids if (ids and ids[-1] == eos) else list(ids) + [eos] for ids in out]
    return [list(ids) for ids in out]


def build_corpus(paths: Sequence[str], tokenizer, *, text_field: str = "text", min_doc_tokens: int = 2,
                 add_eos: bool = True, cache_dir: Optional[str] = None, allow_empty: bool = False,
                 log=print, warn: bool = True, batch_docs: int = 256, progress: bool = False) -> Corpus:
    """Read, validate and tokenize the ``--data`` paths (see the module docstring).

    Args:
        min_doc_tokens: documents with fewer tokens (EOS included) are skipped and counted.
        cache_dir: where to keep the tokenized corpus (``corpus-<hash>.npz``); reused while the files, the
            tokenizer and the options are unchanged. ``None``: no cache.
        allow_empty: return an empty corpus instead of raising (the synthetic task alone feeds training).
    Raises:
        DataError: no supported file, or no usable document left (the message lists why per file).
    """
    files, ignored = discover_files(paths) if paths else ([], [])
    if ignored and warn:
        warnings.warn(f"ignored {len(ignored)} file(s) of unsupported types under --data (e.g. {ignored[0]}); "
                      f"supported: {', '.join(SUPPORTED_EXTS)}", DataWarning, stacklevel=2)
    if not files:
        if allow_empty:
            return Corpus(np.zeros(0, np.uint32), np.zeros(1, np.int64))
        raise DataError(f"no data files found in {list(paths)} (supported: {', '.join(SUPPORTED_EXTS)})")
    cache = None
    if cache_dir:
        cache = os.path.join(cache_dir, f"corpus-{corpus_key(files, tokenizer, text_field, min_doc_tokens, add_eos)}.npz")
        if os.path.exists(cache):
            with np.load(cache, allow_pickle=False) as z:
                corpus = Corpus(z["tokens"], z["offsets"])
                meta = json.loads(str(z["reports"]))
            corpus.reports = [FileReport(path=m["path"], docs=m["docs"], tokens=m["tokens"], skipped=m["skipped"],
                                         fatal=m["fatal"]) for m in meta]
            _report(corpus, warn=warn, allow_empty=allow_empty)
            log(f"data: {corpus.num_docs} documents, {corpus.num_tokens} tokens from {len(files)} file(s) (cached {cache})")
            return corpus
    chunks: List[np.ndarray] = []
    lengths: List[int] = []
    reports: List[FileReport] = []
    it: Iterable[str] = files
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(files, desc="tokenizing", unit="file")
    for path in it:
        rep = FileReport(path)
        reports.append(rep)
        pending: List[str] = []

        def flush() -> None:
            for ids in tokenize_documents(tokenizer, pending, add_eos):
                if len(ids) < min_doc_tokens:
                    rep.skip(f"shorter than {min_doc_tokens} tokens")
                    continue
                chunks.append(np.asarray(ids, dtype=np.uint32))
                lengths.append(len(ids))
                rep.docs += 1
                rep.tokens += len(ids)
            pending.clear()

        try:
            for text in read_documents(path, text_field, rep):
                pending.append(text)
                if len(pending) >= batch_docs:
                    flush()
        except OSError as e:
            rep.fatal = f"cannot be read: {e}"
        flush()
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.uint32)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    corpus = Corpus(tokens, offsets, reports)
    _report(corpus, warn=warn, allow_empty=allow_empty)
    if cache and corpus.num_docs:
        os.makedirs(cache_dir, exist_ok=True)
        meta = json.dumps([r.__dict__ for r in reports])
        tmp = cache + f".tmp{os.getpid()}.npz"
        np.savez(tmp, tokens=tokens, offsets=offsets, reports=np.array(meta))
        os.replace(tmp, cache)
    log(f"data: {corpus.num_docs} documents, {corpus.num_tokens} tokens from {len(files)} file(s)")
    return corpus


def _report(corpus: Corpus, warn: bool, allow_empty: bool) -> None:
    bad = [r.message() for r in corpus.reports if r.message()]
    if warn:
        for m in bad:
            warnings.warn(m, DataWarning, stacklevel=3)
    if corpus.num_docs == 0 and not allow_empty:
        why = "\n  ".join(bad) if bad else "(no documents)"
        raise DataError(f"no usable training data in {len(corpus.reports)} file(s):\n  {why}")


# ---------------------------------------------------------------------------------------------- synthetic
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "A river runs through the valley and the trees grow tall along its banks.",
    "Every morning the baker opens the shop and the smell of bread fills the street.",
    "The old clock in the hall ticks slowly while the rain falls on the roof.",
    "Ships sail across the sea, carrying grain, wood and letters to distant towns.",
    "In the library the books stand in long rows, waiting for someone to read them.",
)


class SyntheticTask:
    """Built-in long-context retrieval examples of exactly ``seq_len`` tokens, from a seed (no files needed).

    ``passkey``: a five-digit pass key stated once somewhere in repetitive filler text, asked for at the end.
    ``kv``: a list of random hexadecimal key-value pairs; the value of one of them is asked for at the end.
    The depth of the needle is uniform over the context. Each example is one document (position ids 0..T-1).
    """

    TASKS = ("passkey", "kv")

    def __init__(self, tokenizer, seq_len: int, tasks: Sequence[str] = TASKS):
        for t in tasks:
            if t not in self.TASKS:
                raise DataError(f"unknown synthetic task {t!r}; choose from {', '.join(self.TASKS)}")
        self.tok = tokenizer
        self.seq_len = seq_len
        self.tasks = tuple(tasks)
        self.bos = [] if getattr(tokenizer, "bos_token_id", None) is None else [tokenizer.bos_token_id]
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.filler = [self._enc(" " + s) for s in FILLER]
        need = max(sum(map(len, self._skeleton(t, np.random.default_rng(0)))) for t in self.tasks) + 16
        if seq_len < need:
            raise DataError(f"--seq-len {seq_len} is too short for the synthetic task (needs >= {need} tokens)")

    def _enc(self, s: str) -> List[int]:
        return list(self.tok(s, add_special_tokens=False)["input_ids"])

    def _skeleton(self, task: str, rng: np.random.Generator) -> Tuple[List[int], List[int], List[int]]:
        """(intro, needle, question+answer) token lists."""
        if task == "passkey":
            key = int(rng.integers(10000, 100000))
            intro = self.bos + self._enc("There is a pass key hidden inside a lot of irrelevant text. "
                                         "Find it and memorize it. I will quiz you about the pass key.")
            needle = self._enc(f" The pass key is {key}. Remember it. {key} is the pass key.")
            qa = self._enc(f"\nWhat is the pass key? The pass key is {key}.")
        else:
            k, v = (f"{int(x):08x}" for x in rng.integers(0, 2 ** 32, size=2))
            intro = self.bos + self._enc("Below is a list of keys and values. Remember them.")
            needle = self._enc(f"\n{k}: {v}")
            qa = self._enc(f"\nWhat is the value of key {k}? The value of key {k} is {v}.")
        if self.eos is not None:
            qa = qa + [self.eos]
        return intro, needle, qa

    def _fill(self, task: str, n: int, rng: np.random.Generator) -> List[int]:
        out: List[int] = []
        if task == "kv":
            while len(out) < n:
                pairs = rng.integers(0, 2 ** 32, size=(16, 2))
                out += self._enc("".join(f"\n{int(a):08x}: {int(b):08x}" for a, b in pairs))
        else:
            while len(out) < n:
                out += self.filler[int(rng.integers(len(self.filler)))]
        return out[:n]

    def example(self, rng: np.random.Generator) -> np.ndarray:
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        intro, needle, qa = self._skeleton(task, rng)
        room = self.seq_len - len(intro) - len(needle) - len(qa)
        before = int(rng.integers(0, room + 1))
        ids = intro + self._fill(task, before, rng) + needle + self._fill(task, room - before, rng) + qa
        assert len(ids) == self.seq_len
        return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- packing
def labels_from(input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    """Next-token labels inside each document: ``-100`` where the next token starts a new document, and last."""
    labels = np.full_like(input_ids, IGNORE_INDEX)
    labels[:-1] = np.where(position_ids[1:] != 0, input_ids[1:], IGNORE_INDEX)
    return labels


class PackedStream:
    """An endless deterministic stream of packed sequences (see the module docstring).

    ``next_sequence()`` returns a dict of int64 numpy arrays ``input_ids``, ``position_ids``, ``labels`` of
    length ``seq_len`` and ``synthetic`` (bool). ``state_dict()`` / ``load_state_dict()`` save and restore the
    position; the sequence numbered ``i`` depends only on ``seed``, the corpus and ``i``.
    """

    def __init__(self, corpus: Corpus, seq_len: int, seed: int = 0, shuffle: bool = True,
                 synthetic: Optional[SyntheticTask] = None, synthetic_ratio: float = 0.0):
        if seq_len < 2:
            raise DataError(f"--seq-len must be >= 2, got {seq_len}")
        if not 0.0 <= synthetic_ratio <= 1.0:
            raise DataError(f"--synthetic-ratio must be in [0, 1], got {synthetic_ratio}")
        if synthetic_ratio > 0 and synthetic is None:
            raise DataError("synthetic_ratio > 0 needs a SyntheticTask")
        if corpus.num_docs == 0 and synthetic_ratio < 1.0:
            raise DataError("no usable documents: give --data files, or train on the synthetic task alone "
                            "with --synthetic-ratio 1")
        self.corpus, self.seq_len, self.seed, self.shuffle = corpus, seq_len, seed, shuffle
        self.synthetic, self.synthetic_ratio = synthetic, float(synthetic_ratio)
        self.seq_index = 0   # sequences produced so far
        self.epoch = 0       # passes over the corpus
        self.cursor = 0      # next document, in the epoch's order
        self.offset = 0      # tokens of that document already used
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1

    # -- position
    def state_dict(self) -> Dict[str, Any]:
        return {"seq_index": self.seq_index, "epoch": self.epoch, "cursor": self.cursor, "offset": self.offset,
                "seed": self.seed, "seq_len": self.seq_len, "num_docs": self.corpus.num_docs,
                "num_tokens": self.corpus.num_tokens, "synthetic_ratio": self.synthetic_ratio}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        now = {"seed": self.seed, "seq_len": self.seq_len, "synthetic_ratio": self.synthetic_ratio,
               "num_docs": self.corpus.num_docs, "num_tokens": self.corpus.num_tokens}
        diff = [f"{k} was {state[k]} in the checkpoint, now {v}" for k, v in now.items() if k in state and state[k] != v]
        if diff:
            raise DataError("cannot resume the data stream: " + "; ".join(diff) +
                            " (use the same --data, tokenizer, --seq-len, --seed and --synthetic-ratio)")
        self.seq_index, self.epoch = int(state["seq_index"]), int(state["epoch"])
        self.cursor, self.offset = int(state["cursor"]), int(state["offset"])

    # -- stream
    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = self.corpus.num_docs
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = self.epoch
        return self._order

    def _is_synthetic(self, i: int) -> bool:
        r = self.synthetic_ratio
        if r <= 0.0:
            return False
        if r >= 1.0:
            return True
        return bool(np.random.default_rng([self.seed, i, 1]).random() < r)

    def next_sequence(self) -> Dict[str, np.ndarray]:
        T, i = self.seq_len, self.seq_index
        self.seq_index += 1
        if self._is_synthetic(i):
            ids = self.synthetic.example(np.random.default_rng([self.seed, i, 2]))
            pos = np.arange(T, dtype=np.int64)
            return {"input_ids": ids, "position_ids": pos, "labels": labels_from(ids, pos), "synthetic": True}
        ids = np.empty(T, np.int64)
        pos = np.empty(T, np.int64)
        filled = 0
        while filled < T:
            order = self._epoch_order()
            doc = self.corpus.doc(int(order[self.cursor]))
            take = min(len(doc) - self.offset, T - filled)
            ids[filled:filled + take] = doc[self.offset:self.offset + take]
            pos[filled:filled + take] = np.arange(take)
            filled += take
            self.offset += take
            if self.offset == len(doc):
                self.offset = 0
                self.cursor += 1
                if self.cursor == self.corpus.num_docs:
                    self.cursor = 0
                    self.epoch += 1
        return {"input_ids": ids, "position_ids": pos, "labels": labels_from(ids, pos), "synthetic": False}

    def take(self, n: int) -> List[Dict[str, np.ndarray]]:
        return [self.next_sequence() for _ in range(n)]


def collate(seqs: Sequence[Dict[str, np.ndarray]]):
    """Concatenate packed sequences into one ``B == 1`` row (the layer derives ``cu_seqlens`` from the
    position ids, which restart at every sequence and document start). Returns torch tensors
    ``input_ids, position_ids, labels`` of shape ``[1, n * seq_len]``."""
    import torch
    cat = {k: np.concatenate([s[k] for s in seqs]) for k in ("input_ids", "position_ids", "labels")}
    return (torch.from_numpy(cat["input_ids"])[None], torch.from_numpy(cat["position_ids"])[None],
            torch.from_numpy(cat["labels"])[None])


def cu_seqlens_of(position_ids: np.ndarray) -> np.ndarray:
    """Document starts of a packed row (and its length), as the layer derives them: ``[0, s1, ..., T]``."""
    starts = np.flatnonzero(np.asarray(position_ids) == 0)
    return np.concatenate([starts, [len(position_ids)]]).astype(np.int64)


__all__ = ["DataError", "DataWarning", "Corpus", "FileReport", "PackedStream", "SyntheticTask", "build_corpus",
           "collate", "cu_seqlens_of", "discover_files", "labels_from", "read_documents", "IGNORE_INDEX",
           "SUPPORTED_EXTS"]
