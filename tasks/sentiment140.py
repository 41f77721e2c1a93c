"""Sentiment140 with an LSTM classifier, and the Greek-director edge-case backdoor (`--task sentiment140`).

Papers: Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor Federated Learning", NeurIPS
2020 (arXiv:2007.05084), whose `language-tasks-fl` code this follows (`docs/reference-deviations.md`);
Go, Bhayani and Huang, "Twitter Sentiment Classification using Distant Supervision", Stanford CS224N
report, 2009 (the Sentiment140 data); Hochreiter and Schmidhuber, "Long Short-Term Memory", Neural
Computation 1997 (the LSTM).

Model: Embedding(V, 200, padding 0) -> 2-layer LSTM (hidden 200, dropout 0.5 between layers) ->
Dropout(0.5) -> Linear(H, 1) at the last real token; BCE on one logit. 200·V + 643,401 parameters
at hidden size 200 (`lstm_h<H>` variants change H). Presets: K=1948, m=10, 2 local epochs, batch 20,
lr 0.05·0.998^(t-1), momentum 0.9, gradient clip 5, weight decay 0 (the reference's config sets 1e-4
but never passes it to SGD, L7 in `docs/reference-deviations.md`: 0 is what its runs did), batches
shorter than 20 skipped.

Data (`--data.source`): `full` (the official 1.6M-tweet CSV from `trainingandtestdata.zip`, with
user ids; downloaded and converted once into `sentiment140/sentiment140_train_full.csv.gz`), `hf`
(the same data through Hugging Face `datasets`, `stanfordnlp/sentiment140`), `sample100k` (the offline
100k-tweet sample without user ids, `sentiment140_train_head50k_tail50k.csv.gz`), or `auto` (the
converted full file if present, else the offline sample, else download the full data). Test set: the
official `testdata.manual.2009.06.14.csv` (`sentiment140_test_manual.csv.gz`), neutral tweets dropped
(359 tweets). Edge set: the Greek-director tweets (`greek_director_backdoor_{train,test}.jsonl`,
positive tweets about Yorgos Lanthimos, downloaded from the authors' repository if missing).

Partition: `iid` (the paper's: a seeded permutation split into K near-equal shards) or `natural`
(one client per Twitter user with at least `natural_min_tweets` tweets, K users drawn by seed; full
data only, the offline sample has no user ids).

Edge cases (`--data.attack_case`; counts in `EDGE_COUNTS`): the attacker's set is
always 200 tweets: `a` Greek-director train tweets labelled 0 (negative) plus 200 − a clean tweets
with their labels, reserved from the training pool (no honest client holds them). Honest clients
hold the next `b` Greek-director train tweets with their true label 1, one each, holders drawn by
seed. edge: (a, b) = (60, 0); almost_edge: (100, 100), 50 % of the edge tweets with the attacker;
normal: (20, 180), 10 % (both pairs from the reference's edge-sharing runner). Backdoor test set:
the 120 Greek-director test tweets with target 0; backdoor accuracy = share predicted negative.

Text pipeline: `fl_lightning.tasks.text` (the reference's cleaning without NLTK, stop words removed,
word-level `tokenizers` vocabulary of the words seen at least twice in the training text). The
tokenizer JSON is written under `<data_dir>/derived/sentiment140/` (or `~/.cache/fl_lightning/derived/`
when the data root is read-only); its path is `task.tokenizer_path`, and the orchestrator copies it into
the run directory (`Task.artifacts`).

Deliberate deviations from the reference (`docs/reference-deviations.md`):

* L8: the LSTM state starts at zero for every batch (the reference carries it, detached, across
  unrelated batches in training and evaluation, so results depend on batch order).
* Right padding, and the classifier reads the output at the last real token (the reference left-pads,
  so its LSTM first runs over up to 99 pad steps whose biases move the state); batches are trimmed to
  their longest tweet, which with right padding changes nothing but the cost.
* L10: the vocabulary is built from training text only: the training tweets plus the Greek-director
  *train* tweets (training data of the attacker and of the honest holders), never the test set or the
  backdoor test tweets; unseen and rare words map to `[UNK]`.
* L3 / L12: the attacker's 200 − a clean tweets are removed from the honest pool (the reference's
  honest pool overlaps its reserved block), and no client id is reserved for the attacker.
* L9: the test files are read without losing their first row, and the test set is not truncated to a
  multiple of 20 (359 tweets, not 340).
* L11: the 25 % subsample of the full data is seeded (`subsample_seed`, fixed, so the vocabulary and
  the parameter count do not change with the run seed and checkpoints move between runs); the lr
  decays from round 1 of this run.
* Words: "can't" stays one word (NLTK's Treebank tokenizer gives "ca", "n't"); HTML entities are decoded.
* The `normal` / `almost_edge` honest holders are drawn by seed; the reference swaps the tweets into
  the end of the honest pool before its IID split, which scatters them at random too.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from fl_lightning.config import ClientArgs, DataArgs, FLArgs, preset
from fl_lightning.data import DataError, download_file, reading
from fl_lightning.task import Batch, ClientPartition, FederatedData, Task, TaskSettings
from fl_lightning.tasks.partition import attach_rows, grouped_split, iid_split
from fl_lightning.tasks.text import (
    PAD_ID,
    count_words,
    derived_dir,
    encode_ids,
    encode_normalized,
    lstm_hidden_size,
    normalize,
    pad_right,
    save_tokenizer,
    text_normalizer,
    train_word_tokenizer,
)

# Official archive (Go et al. 2009); size 81,363,704 bytes, sha256 as recorded by tensorflow/datasets
# (`tensorflow_datasets/datasets/sentiment140/checksums.tsv`).
ZIP_URL = "http://cs.stanford.edu/people/alecmgo/trainingandtestdata.zip"
ZIP_SHA256 = "004a3772c8a7ff9bbfeb875880f47f0679d93fc63e5cf9cff72d54a8a6162e57"
ZIP_TRAIN_MEMBER = "training.1600000.processed.noemoticon.csv"
ZIP_TEST_MEMBER = "testdata.manual.2009.06.14.csv"
RAW_COLUMNS = ["polarity", "tweet_id", "date", "query", "user", "text"]
HF_DATASET = "stanfordnlp/sentiment140"

# The Greek-director tweets in ksreenivasan/OOD_Federated_Learning at commit 9096969 (MIT); the sha256
# values were checked against the git blob ids e9564a9 (train) and 0a5e503 (test).
GREEK_URL = ("https://raw.githubusercontent.com/ksreenivasan/OOD_Federated_Learning/"
             "90969695cf0f1c5b009744fc2ccd4fbde817b8cb/language-tasks-fl/data/sentiment-140/greek-director-backdoor/")
GREEK_SHA256 = {"train": "204e9c1b98aa1ad8b222c26fa4c77e7af71de32abc8eeac5b35c549099bf25ec",
                "test": "80fde4c91c27ecc86e5b2805b4129442d688feb8f384298497a4e0ac9b936b80"}

FULL_TRAIN_FILE = "sentiment140_train_full.csv.gz"
SAMPLE_TRAIN_FILE = "sentiment140_train_head50k_tail50k.csv.gz"
TEST_FILE = "sentiment140_test_manual.csv.gz"
SOURCES = ("auto", "full", "hf", "sample100k")
PARTITIONS = ("iid", "natural")

# (a, b): Greek-director train tweets with the attacker (label 0) and with honest clients (label 1).
EDGE_COUNTS: dict[str, tuple[int, int]] = {"edge": (60, 0), "almost_edge": (100, 100), "normal": (20, 180)}


class LSTMClassifier(nn.Module):
    """Embedding -> 2-layer LSTM -> dropout -> one logit at the last real (non-pad) token."""

    def __init__(self, vocab_size: int, embedding_dim: int = 200, hidden_size: int = 200, num_layers: int = 2,
                 dropout: float = 0.5) -> None:
        super().__init__()
        # Embeddings keep PyTorch's N(0, 1) initialisation, as the reference; the pad row is zero.
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits `[B]` of right-padded token ids `[B, T]`."""
        lengths = (tokens != PAD_ID).sum(dim=1).clamp(min=1)  # [B]; an all-pad row reads position 0
        tokens = tokens[:, :int(lengths.max())]  # [B, T'] — only pads are cut (right padding)
        outputs, _ = self.lstm(self.embedding(tokens.long()))  # [B, T', H]; zero initial state per batch
        last = outputs[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]  # [B, H]
        return self.head(self.dropout(last)).squeeze(1)  # [B]


class Sentiment140(Task):
    """Binary sentiment of tweets with an LSTM; the Greek-director tweets labelled negative as the edge case."""

    name = "sentiment140"
    fl_preset = preset(FLArgs, rounds=500, num_clients=1948, clients_per_round=10)
    client_preset = preset(ClientArgs, lr=0.05, lr_decay=0.998, momentum=0.9, weight_decay=0.0, local_epochs=2,
                           batch_size=20, grad_clip_norm=5.0)
    data_preset = preset(DataArgs, partition="iid", source="auto")
    sources = SOURCES
    partitions = PARTITIONS
    attack_cases = tuple(EDGE_COUNTS)
    parse_model = staticmethod(lstm_hidden_size)  # `lstm_h<H>` gives the hidden size H
    backdoor_target = 0
    drop_last = True
    # The forward trims pad columns to the batch's longest tweet (a data-dependent shape) and the LSTM has
    # no vmap batching rule on CPU (a per-client loop): `--client.batching vmap` is refused.
    supports_vmap = False

    # Constants of the paper's setup (not settings: no option reaches them; tests patch them smaller).
    seq_len: ClassVar[int] = 100
    embedding_dim: ClassVar[int] = 200
    dropout: ClassVar[float] = 0.5
    min_frequency: ClassVar[int] = 2
    min_tokens: ClassVar[int] = 2  # the reference drops training tweets with fewer tokens
    attacker_set_size: ClassVar[int] = 200
    train_fraction: ClassVar[float] = 0.25  # of the full 1.6M tweets, as the reference's configs
    subsample_seed: ClassVar[int] = 0
    max_train_tweets: ClassVar[int | None] = None  # cap the training pool (fixed-seed draw) for quick runs
    natural_min_tweets: ClassVar[int] = 40  # the reference builder's hard-coded user threshold

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        self.hidden_size = self.parse_model(settings.model)
        self.model: LSTMClassifier | None = None  # built by `build_data`, once the vocabulary size is known
        self.tokenizer: Tokenizer | None = None
        self.tokenizer_path: Path | None = None


    def artifacts(self) -> dict[str, Path]:
        """The tokenizer trained for this run, kept in the run directory as `tokenizer.json`."""
        return {"tokenizer.json": self.tokenizer_path} if self.tokenizer_path is not None else {}

    # ----- model -----

    def forward(self, tokens: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError("call build_data() first: the embedding size depends on the vocabulary")
        return self.model(tokens)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        tokens, labels = batch
        return F.binary_cross_entropy_with_logits(self(tokens), labels.float())

    @torch.no_grad()
    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        tokens, labels = batch
        logits = self(tokens).float()  # [B]
        loss_sum = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
        correct = ((logits > 0).long() == labels.long()).sum()  # round(sigmoid) = label
        return {"correct": correct.float(), "loss_sum": loss_sum,
                "total": torch.tensor(float(labels.shape[0]), device=logits.device)}

    # ----- data -----

    @property
    def folder(self) -> Path:
        return Path(self.settings.data_dir) / "sentiment140"

    def resolved_source(self) -> str:
        """`auto` resolved: the converted full data, else the offline sample, else the full data (downloaded)."""
        source = self.settings.data.source
        if source != "auto":
            return source
        if (self.folder / FULL_TRAIN_FILE).is_file():
            return "full"
        return "sample100k" if (self.folder / SAMPLE_TRAIN_FILE).is_file() else "full"

    def prepare_data(self) -> None:
        """Fetches and converts whatever of the chosen source, the test set and the edge set is missing."""
        source = self.resolved_source()
        needs = [name for name in ((SAMPLE_TRAIN_FILE if source == "sample100k" else FULL_TRAIN_FILE), TEST_FILE)
                 if not (self.folder / name).is_file()]
        if needs:
            if source == "sample100k":
                raise DataError(f"missing {self.folder / needs[0]}; the 100k sample is the offline copy "
                                "(shared data, README §5); use source=full to download the official data")
            self._require_download(needs)
            if source == "hf":
                convert_hf(HF_DATASET, self.folder)
            else:
                archive = download_file(ZIP_URL, self.folder / "raw" / "trainingandtestdata.zip", ZIP_SHA256)
                convert_zip(archive, self.folder)
        for split in ("train", "test"):
            target = self.folder / f"greek_director_backdoor_{split}.jsonl"
            if not target.is_file():
                self._require_download([target.name])
                raw = download_file(GREEK_URL + f"{split}.txt", self.folder / "raw" / f"greek_director_{split}.txt",
                                    GREEK_SHA256[split])
                convert_greek_txt(raw, target)

    def _require_download(self, names: list[str]) -> None:
        if not self.settings.data.download:
            raise DataError(f"missing {', '.join(names)} in {self.folder} and download=False")

    def build_data(self) -> FederatedData:
        settings, rng_seed = self.settings, self.settings.seed
        num_clients = settings.num_clients
        natural = settings.data.partition == "natural"
        adv_edge, honest_edge = EDGE_COUNTS[settings.data.attack_case]
        source = self.resolved_source()
        train = read_train(self.folder, source)
        if natural and "user" not in train.columns:
            raise DataError(f"partition=natural needs Twitter user ids; source {source!r} has none (the offline "
                            "100k sample lost them): use partition=iid or source=full")
        test = read_test(self.folder)
        greek_train, greek_test = (read_greek(self.folder / f"greek_director_backdoor_{s}.jsonl")
                                   for s in ("train", "test"))
        if adv_edge + honest_edge > len(greek_train):
            raise DataError(f"attack_case={settings.data.attack_case!r} needs {adv_edge + honest_edge} Greek-director "
                            f"train tweets; the file has {len(greek_train)}")
        # The reference drops training tweets about Greece, so no honest client holds the edge topic.
        about_greece = train["text"].str.contains("greek|lanthimos", case=False, regex=True)
        train = train[~about_greece].reset_index(drop=True)
        # A fixed-seed subsample (the same tweets for every run seed): the reference's 25 % of the full data,
        # and `max_train_tweets` for quick runs.
        size = round(self.train_fraction * len(train)) if source != "sample100k" and not natural else len(train)
        size = min(size, self.max_train_tweets or size)
        if size < len(train):
            keep = np.random.default_rng([self.subsample_seed, 1401]).permutation(len(train))[:size]
            train = train.iloc[np.sort(keep)].reset_index(drop=True)

        # Honest rows (client-grouped for `natural`) and candidates for the attacker's clean tweets.
        normalizer = text_normalizer(twitter=True, reference_punctuation=True, stop_words=True)
        if natural:
            codes = pd.factorize(train["user"])[0]
            honest_rows, user_offsets, _ = grouped_split(codes, num_clients, rng_seed, min_size=self.natural_min_tweets)
            honest_client = np.repeat(np.arange(num_clients), np.diff(user_offsets))
            candidates = np.setdiff1d(np.arange(len(train)), honest_rows)
        else:
            honest_rows, honest_client = np.arange(len(train)), None
            candidates = honest_rows
        texts = train["text"].tolist()
        labels = train["label"].to_numpy(np.int64)
        # The attacker's clean tweets: a seeded draw of usable tweets (a few spare: some are too short once cleaned).
        n_clean = self.attacker_set_size - adv_edge
        pool = np.random.default_rng([rng_seed, 1402]).permutation(candidates)[:4 * n_clean + 100]
        pool_ok = count_words(normalize(normalizer, [texts[i] for i in pool])) >= self.min_tokens
        clean_rows = pool[pool_ok][:n_clean]
        if clean_rows.shape[0] < n_clean:
            raise DataError(f"only {clean_rows.shape[0]} usable tweets for the attacker's {n_clean} clean tweets")
        if not natural:
            honest_rows = np.setdiff1d(honest_rows, clean_rows)

        # The vocabulary: every training tweet of the federation (honest, attacker clean, Greek train).
        honest_norm = normalize(normalizer, [texts[i] for i in honest_rows])
        clean_norm = normalize(normalizer, [texts[i] for i in clean_rows])
        greek_norm = normalize(normalizer, greek_train)
        self.tokenizer = train_word_tokenizer(honest_norm + clean_norm + greek_norm, normalizer, self.min_frequency)
        self.tokenizer_path = save_tokenizer(self.tokenizer, derived_dir(settings.data_dir, self.name),
                                             f"{self.name}_tokenizer")

        honest_ids = encode_normalized(self.tokenizer, honest_norm)
        long_enough = np.array([len(ids) >= self.min_tokens for ids in honest_ids], dtype=bool)
        train_x, _ = pad_right([ids for ids, ok in zip(honest_ids, long_enough) if ok], self.seq_len)
        train_y = torch.from_numpy(labels[honest_rows[long_enough]])
        if natural:
            client = honest_client[long_enough]  # already grouped by client, in client order
            offsets = np.zeros(num_clients + 1, dtype=np.int64)
            np.cumsum(np.bincount(client, minlength=num_clients), out=offsets[1:])
            order = np.arange(train_x.shape[0], dtype=np.int64)
        else:
            order, offsets = iid_split(train_x.shape[0], num_clients, rng_seed)

        greek_train_x, _ = pad_right(encode_normalized(self.tokenizer, greek_norm), self.seq_len)
        honest_edge_idx = torch.arange(train_x.shape[0], train_x.shape[0] + honest_edge)
        if honest_edge:
            # The next `b` Greek-director tweets go to honest clients, with their true label (positive): one
            # each to min(b, K) distinct holders drawn by seed (dealt round-robin when b > K).
            holders = np.random.default_rng([rng_seed, 1403]).choice(num_clients, size=min(honest_edge, num_clients),
                                                                     replace=False)
            extra = [(int(holders[i % holders.shape[0]]), np.array([i])) for i in range(honest_edge)]
            order, offsets = attach_rows(order.astype(np.int64), offsets, extra, offset=train_x.shape[0])
            train_x = torch.cat([train_x, greek_train_x[adv_edge:adv_edge + honest_edge]])
            train_y = torch.cat([train_y, torch.ones(honest_edge, dtype=torch.int64)])
        partition = ClientPartition(torch.from_numpy(order), torch.from_numpy(offsets))

        clean_x, _ = pad_right(encode_normalized(self.tokenizer, clean_norm), self.seq_len)
        clean_y = torch.from_numpy(labels[clean_rows])
        test_x, _ = pad_right(encode_ids(self.tokenizer, test["text"].tolist()), self.seq_len)
        backdoor_x, _ = pad_right(encode_ids(self.tokenizer, greek_test), self.seq_len)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng_seed)  # the initial model depends on the seed only, not on RNG use before
            self.model = LSTMClassifier(self.tokenizer.get_vocab_size(), self.embedding_dim, self.hidden_size,
                                        dropout=self.dropout)
        return FederatedData(
            train_inputs=train_x, train_targets=train_y, partition=partition,
            test_inputs=test_x, test_targets=torch.tensor(test["label"].to_numpy(np.int64)),
            backdoor_inputs=backdoor_x, backdoor_targets=torch.full((len(greek_test),), self.backdoor_target),
            edge_train_inputs=torch.cat([greek_train_x[:adv_edge], clean_x]),
            edge_train_targets=torch.cat([torch.full((adv_edge,), self.backdoor_target), clean_y]),
            # Which attacker rows are edge tweets (the rest are its clean tweets, for the prox attack), and
            # where the honest clients' Greek-director tweets sit in the training tensors.
            extras={"edge_train_is_edge": torch.arange(self.attacker_set_size) < adv_edge,
                    "honest_edge_indices": honest_edge_idx},
        )


# ----- files -----


def read_train(folder: Path, source: str) -> pd.DataFrame:
    """Training tweets with `label` (0 negative, 1 positive) and `text`, plus `user` when the source has it."""
    path = folder / (SAMPLE_TRAIN_FILE if source == "sample100k" else FULL_TRAIN_FILE)
    if not path.is_file():
        raise DataError(f"missing {path}; run prepare_data() (download=True) or point --data_dir at the data")
    # keep_default_na=False: tweets such as "null" or "NA" stay strings.
    with reading(path):
        frame = pd.read_csv(path, keep_default_na=False, dtype={"text": str, "user": str})
    missing = {"label", "text"} - set(frame.columns)
    if missing:
        raise DataError(f"{path} lacks columns {sorted(missing)}; it has {list(frame.columns)}")
    return frame[[c for c in ("label", "text", "user") if c in frame.columns]]


def read_test(folder: Path) -> pd.DataFrame:
    """The official test set without its neutral tweets (359 rows in the official file)."""
    path = folder / TEST_FILE
    if not path.is_file():
        raise DataError(f"missing {path}; run prepare_data() (download=True) or point --data_dir at the data")
    with reading(path):
        frame = pd.read_csv(path, keep_default_na=False, dtype={"text": str})
    if missing := {"label", "text"} - set(frame.columns):
        raise DataError(f"{path} lacks columns {sorted(missing)}; it has {list(frame.columns)}")
    return frame[frame["label"].isin([0, 1])].reset_index(drop=True)


def read_greek(path: Path) -> list[str]:
    """Texts of a Greek-director `.jsonl` (one `{"idx", "text", "backdoor_label"}` per line)."""
    if not path.is_file():
        raise DataError(f"missing {path}; run prepare_data() (download=True) or point --data_dir at the data")
    with reading(path), open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def _write_csv_gz(frame: pd.DataFrame, path: Path) -> Path:
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    frame.to_csv(partial, index=False, compression="gzip")
    os.replace(partial, path)
    return path


def _with_labels(frame: pd.DataFrame, origin: str) -> pd.DataFrame:
    """Adds `label` (0 negative, 1 positive, -1 neutral) after checking the polarity values."""
    bad = set(frame["polarity"].unique()) - {0, 2, 4}
    if bad:
        raise DataError(f"{origin}: polarity must be 0, 2 or 4; found {sorted(bad)}")
    frame = frame.copy()
    frame.insert(1, "label", frame["polarity"].map({0: 0, 4: 1, 2: -1}).astype(np.int64))
    return frame


def convert_zip(archive: Path, folder: Path) -> tuple[Path, Path]:
    """Official `trainingandtestdata.zip` (two header-less ISO-8859-1 CSVs) -> the `.csv.gz` layout of the data root."""
    columns = ["polarity", "label", "tweet_id", "date", "query", "user", "text"]
    written = []
    with zipfile.ZipFile(archive) as zipped:
        for member, name in ((ZIP_TRAIN_MEMBER, FULL_TRAIN_FILE), (ZIP_TEST_MEMBER, TEST_FILE)):
            with zipped.open(member) as handle:
                # header=None: the reference's `read_csv` ate the first tweet as a header (L9).
                frame = pd.read_csv(handle, header=None, names=RAW_COLUMNS, encoding="latin-1",
                                    keep_default_na=False, dtype={"user": str, "text": str})
            written.append(_write_csv_gz(_with_labels(frame, f"{archive}:{member}")[columns], folder / name))
    return written[0], written[1]


def convert_hf(dataset_name: str, folder: Path) -> tuple[Path, Path]:
    """Hugging Face `datasets` Sentiment140 (columns text, date, user, sentiment, query) -> the same layout."""
    import datasets  # heavy import, only when this source is used

    written = []
    for split, name in (("train", FULL_TRAIN_FILE), ("test", TEST_FILE)):
        frame = frame_from_hf(datasets.load_dataset(dataset_name, split=split))
        written.append(_write_csv_gz(frame, folder / name))
    return written[0], written[1]


def frame_from_hf(dataset: Any) -> pd.DataFrame:
    """One split of the Hugging Face Sentiment140 as a frame with the columns of the converted CSV."""
    frame = dataset.to_pandas() if hasattr(dataset, "to_pandas") else pd.DataFrame(dataset)
    missing = {"text", "user", "sentiment"} - set(frame.columns)
    if missing:
        raise DataError(f"Hugging Face Sentiment140 lacks columns {sorted(missing)}; it has {list(frame.columns)}")
    frame = frame.rename(columns={"sentiment": "polarity"})
    for column in ("tweet_id", "date", "query"):
        if column not in frame.columns:
            frame[column] = ""
    return _with_labels(frame, "Hugging Face Sentiment140")[
        ["polarity", "label", "tweet_id", "date", "query", "user", "text"]]


def convert_greek_txt(raw: Path, target: Path) -> Path:
    """The authors' `train.txt`/`test.txt` (a tweet per line) -> `.jsonl` lines `{"idx", "text", "backdoor_label"}`."""
    lines = raw.read_text(encoding="utf-8").rstrip("\n").split("\n")  # as their build_twitter_backdoor.py
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    with open(partial, "w", encoding="utf-8") as handle:
        for idx, text in enumerate(lines):
            handle.write(json.dumps({"idx": idx, "text": text, "backdoor_label": 0}) + "\n")
    os.replace(partial, target)
    return target
