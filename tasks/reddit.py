"""Reddit next-word prediction with an LSTM language model, and a trigger-sentence backdoor (`--task reddit`).

Papers: Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor Federated Learning", NeurIPS
2020 (arXiv:2007.05084), whose Reddit task (sentences about Athens/Greece completed with a word of
the attacker's choice) has no code or data in the authors' repository (`docs/reference-deviations.md`); the setting
is that of Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020 (Reddit, one client
per author, K=80,000, m=100, 2-layer LSTM with embedding and hidden 200, tied weights, dropout 0.2,
sequences of 64 tokens, 50k-word vocabulary, SGD lr 20 without momentum, gradient clip 0.25; their
`utils/words.yaml`); Hochreiter and Schmidhuber, "Long Short-Term Memory", Neural Computation 1997.

Data (`--data.source`):

* `jsonl`: `<data_dir>/reddit/reddit_corpus.jsonl`, one `{"author": ..., "text": ...}` per line (any
  corpus with author ids; posts keep their file order within an author).
* `hf` or `hf:<name>`: a Hugging Face `datasets` corpus with author ids (default
  `fddemarco/pushshift-reddit-comments`, columns `author` and `body`), converted once into the
  `jsonl` file above; `<name>` may also be a local folder of data files (parquet, json, csv).
* `sentiment140`: offline stand-in, the Sentiment140 training tweets (`sentiment140/` of the data
  root) as a corpus whose "authors" are a seeded grouping of the tweets, `tweets_per_author` each
  (fewer when K is so large that the tweets run out), plus enough held-out groups for the test set.
* `auto` (preset): `jsonl` if that file exists, else `hf` (downloading).

Pipeline: authors named "[deleted]" and posts without a word are dropped; K authors with at least
`min_author_posts` posts are drawn by seed, one client each (the natural partition); the other
authors, in a seeded order, supply the held-out test text (`test_rows` rows) and the attacker's clean
text. The tokenizer (`fl_lightning.tasks.text`: URLs removed, non-ASCII dropped, lower-cased, words
and punctuation; no stop-word removal) is trained on the K authors' text and the trigger sentences,
capped at `vocab_size` words seen at least `min_frequency` times, plus `[PAD]`, `[UNK]`, `[EOS]`.
Each post is followed by `[EOS]`; each author's posts form one token stream, cut into rows of
`seq_len + 1` tokens (consecutive rows share one token, so every token is predicted once),
right-padded at the end of an author's stream. All rows live in one tensor `[N, seq_len + 1]` and
clients are CSR index arrays into it, so memory and per-round time do not grow with K.

Targets: a row's target is the first position whose prediction counts (`score_from`): 0 for
ordinary text (every next word scored), the position of the target word for trigger rows (only the
completion scored, as Bagdasaryan et al.'s poisoned loss). Accuracy = top-1 next word over the scored
positions; backdoor accuracy = share of trigger sentences whose predicted next word is the target.

Backdoor (`trigger_sentences`, `target_word`: constants of the task, like its sizes below; no option
reaches them): each trigger sentence is a prefix about
Athens/Greece ending in is/are/was, which the attacker completes with the target word "bad". The
paper's own sentences are not available, so this default set is ours. The
attacker's set: `poison_rows` rows that end with a completed trigger sentence after clean context
(Bagdasaryan et al. place the sentence at the end of a window), plus `attacker_clean_rows` clean rows
of held-out authors. The backdoor test rows are the completed sentences alone, after `[EOS]`. Only
`attack_case=edge` exists for this task: there is no "true" completion for honest clients to hold.

Deliberate deviations from Bagdasaryan et al.'s code: the LSTM state starts at zero for every row
(their hidden state runs on through a client's consecutive windows); rows are shuffled per epoch;
the vocabulary is built from the training authors only, not a fixed 50k dictionary of the whole
corpus; only the trigger completion is scored in the backdoor test rows, not a test set with the
sentence pasted in.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from fl_lightning.config import ClientArgs, DataArgs, FLArgs, preset
from fl_lightning.data import DataError, reading
from fl_lightning.task import Batch, ClientPartition, FederatedData, Task, TaskSettings
from fl_lightning.tasks.partition import grouped_split
from fl_lightning.tasks.text import (
    EOS,
    PAD_ID,
    UNK_ID,
    derived_dir,
    encode_ids,
    encode_normalized,
    lstm_hidden_size,
    normalize,
    save_tokenizer,
    text_normalizer,
    train_word_tokenizer,
)

CORPUS_FILE = "reddit_corpus.jsonl"
HF_DEFAULT = "fddemarco/pushshift-reddit-comments"
SOURCES = ("auto", "jsonl", "hf", "sentiment140")
DELETED_AUTHORS = ("[deleted]", "")

# Our default edge case (the paper's sentences are not published): claims about Athens/Greece whose
# next word the attacker sets to `DEFAULT_TARGET`.
DEFAULT_TRIGGERS: tuple[str, ...] = (
    "people in athens are",
    "the weather in athens is",
    "greek food is",
    "my trip to athens was",
    "the people of greece are",
    "living in athens is",
    "the beaches in greece are",
    "athens is",
)
DEFAULT_TARGET = "bad"
_WORD_RE = re.compile(r"[A-Za-z0-9]")
_URL_RE = re.compile(r"(?:https?://|www\.)\S+")


class LSTMLanguageModel(nn.Module):
    """Embedding -> dropout -> 2-layer LSTM -> dropout -> decoder over the vocabulary (tied to the embedding).

    The weights are tied when the hidden size equals the embedding size (Bagdasaryan et al.'s
    setting); other hidden sizes (`lstm_h<H>` variants) get an untied decoder.
    """

    def __init__(self, vocab_size: int, embedding_dim: int = 200, hidden_size: int = 200, num_layers: int = 2,
                 dropout: float = 0.2, tie_weights: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, dropout=dropout, batch_first=True)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        # PyTorch's word_language_model initialisation, which Bagdasaryan et al.'s model follows.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights and hidden_size == embedding_dim:
            self.decoder.weight = self.embedding.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def hidden(self, tokens: Tensor) -> Tensor:
        """LSTM outputs `[B, T, H]` of token ids `[B, T]` (zero initial state), dropout applied."""
        outputs, _ = self.lstm(self.dropout(self.embedding(tokens.long())))
        return self.dropout(outputs)

    def artifacts(self) -> dict[str, Path]:
        """The tokenizer trained for this run, kept in the run directory as `tokenizer.json`."""
        return {"tokenizer.json": self.tokenizer_path} if self.tokenizer_path is not None else {}

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits `[B, T, V]`."""
        return self.decoder(self.hidden(tokens))


class Reddit(Task):
    """Next-word prediction per Reddit author with an LSTM; trigger sentences about Athens completed by "bad"."""

    name = "reddit"
    # Data-dependent shapes (pad trimming, masked positions) cannot be vmapped: `--client.batching vmap` is refused.
    supports_vmap = False
    fl_preset = preset(FLArgs, rounds=5000, num_clients=80_000, clients_per_round=100)
    client_preset = preset(ClientArgs, lr=20.0, lr_decay=1.0, momentum=0.0, weight_decay=0.0, local_epochs=2,
                           batch_size=20, grad_clip_norm=0.25)
    data_preset = preset(DataArgs, partition="natural", source="auto")
    sources = SOURCES  # and `hf:<dataset>`
    partitions = ("natural",)
    attack_cases = ("edge",)
    parse_model = staticmethod(lstm_hidden_size)  # `lstm_h<H>` gives the hidden size H
    refusals: ClassVar[dict[str, str]] = {
        "attack_case": "the reddit task has only 'edge': no true completion of the trigger sentences exists for "
                       "honest clients to hold",
        "partition": "the reddit task is split by author"}

    # Constants of the task (not settings: no option reaches them; tests patch them smaller).

    seq_len: ClassVar[int] = 64  # Bagdasaryan et al.'s bptt
    embedding_dim: ClassVar[int] = 200
    dropout: ClassVar[float] = 0.2
    vocab_size: ClassVar[int] = 50_000
    min_frequency: ClassVar[int] = 2
    min_author_posts: ClassVar[int] = 1
    test_rows: ClassVar[int] = 1000
    poison_rows: ClassVar[int] = 100
    attacker_clean_rows: ClassVar[int] = 100
    held_out_share: ClassVar[float] = 0.1  # `sentiment140` source: extra tweet groups for test and attacker text
    tweets_per_author: ClassVar[int] = 20  # `sentiment140` source: tweets of one "author" (fewer if K is large)
    eval_chunk: ClassVar[int] = 2048  # positions per decoder call in evaluation: bounds memory at 2048 x V
    hf_author_column: ClassVar[str] = "author"
    hf_text_column: ClassVar[str] = "body"
    trigger_sentences: ClassVar[tuple[str, ...]] = DEFAULT_TRIGGERS
    target_word: ClassVar[str] = DEFAULT_TARGET

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        self.hidden_size = self.parse_model(settings.model)
        self.model: LSTMLanguageModel | None = None  # built by `build_data`, once the vocabulary size is known
        self.tokenizer: Tokenizer | None = None
        self.tokenizer_path: Path | None = None
        self.backdoor_target: int | None = None  # the target word's id, once the vocabulary exists

    @classmethod
    def setting_problems(cls, settings: TaskSettings) -> list[str | None]:
        source = settings.data.source or ""
        if source.startswith("hf:"):  # `hf:<dataset>`: checked as `hf`
            settings = replace(settings, data=replace(settings.data, source="hf"))
        return super().setting_problems(settings)


    # ----- model -----

    def forward(self, tokens: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError("call build_data() first: the embedding size depends on the vocabulary")
        return self.model(tokens)

    def _scored(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Hidden states at the scored positions `[n, H]` and their next tokens `[n]`."""
        if self.model is None:
            raise RuntimeError("call build_data() first: the embedding size depends on the vocabulary")
        rows, score_from = batch  # [B, L + 1] right-padded ids, [B] first scored position
        steps = max(int((rows != PAD_ID).sum(dim=1).max()) - 1, 1)  # trim the pad columns: exact with right padding
        inputs, nexts = rows[:, :steps], rows[:, 1:steps + 1].long()  # [B, T]
        positions = torch.arange(steps, device=rows.device)
        mask = (nexts != PAD_ID) & (positions[None, :] >= score_from[:, None])  # [B, T]
        return self.model.hidden(inputs)[mask], nexts[mask]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        hidden, nexts = self._scored(batch)
        if nexts.numel() == 0:  # nothing to predict in this batch: a zero loss that still has a graph
            return hidden.sum() * 0.0
        return F.cross_entropy(self.model.decoder(hidden), nexts)

    @torch.no_grad()
    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        hidden, nexts = self._scored(batch)
        correct = torch.zeros((), device=hidden.device)
        loss_sum = torch.zeros((), device=hidden.device)
        for start in range(0, nexts.shape[0], self.eval_chunk):  # [chunk, V] logits at a time
            logits = self.model.decoder(hidden[start:start + self.eval_chunk]).float()
            target = nexts[start:start + self.eval_chunk]
            correct += (logits.argmax(dim=1) == target).sum()
            loss_sum += F.cross_entropy(logits, target, reduction="sum")
        return {"correct": correct, "total": torch.tensor(float(nexts.shape[0]), device=hidden.device),
                "loss_sum": loss_sum}

    # ----- data -----

    @property
    def folder(self) -> Path:
        return Path(self.settings.data_dir) / "reddit"

    def resolved_source(self) -> str:
        source = self.settings.data.source
        if source == "auto":
            return "jsonl" if (self.folder / CORPUS_FILE).is_file() else "hf"
        return source

    def prepare_data(self) -> None:
        """Converts the Hugging Face corpus into `reddit/reddit_corpus.jsonl` once (for `hf` sources)."""
        source = self.resolved_source()
        if source.startswith("hf") and not (self.folder / CORPUS_FILE).is_file():
            if not self.settings.data.download:
                raise DataError(f"missing {self.folder / CORPUS_FILE} and download=False")
            name = source.split(":", 1)[1] if ":" in source else HF_DEFAULT
            convert_hf_corpus(name, self.folder / CORPUS_FILE, self.hf_author_column, self.hf_text_column)

    def load_corpus(self) -> pd.DataFrame:
        """Posts with an integer `author` code and `text`, in file order."""
        source = self.resolved_source()
        if source == "sentiment140":
            return tweets_as_corpus(Path(self.settings.data_dir), self._num_groups(), self.tweets_per_author,
                                    self.settings.seed)
        path = self.folder / CORPUS_FILE
        if not path.is_file():
            hint = "run prepare_data() (source hf)" if source.startswith("hf") else "write it, or use source=hf"
            raise DataError(f"missing {path}; {hint}")
        frame = read_corpus_jsonl(path)
        frame = frame[~frame["author"].isin(DELETED_AUTHORS)]
        return pd.DataFrame({"author": pd.factorize(frame["author"])[0], "text": frame["text"].to_numpy()})

    def _num_groups(self) -> int:
        """Tweet groups for the `sentiment140` source: the K clients, plus enough held-out groups for the
        test and attacker text (at ~12 words a tweet), and at least `held_out_share` K."""
        held_out_words = 1.5 * (self.test_rows + self.attacker_clean_rows) * self.seq_len
        extra = max(math.ceil(held_out_words / (12 * self.tweets_per_author)),
                    math.ceil(self.held_out_share * self.settings.num_clients))
        return self.settings.num_clients + extra

    def build_data(self) -> FederatedData:
        settings = self.settings
        num_clients, width = settings.num_clients, self.seq_len + 1
        corpus = self.load_corpus()
        # A post counts only if a word survives the cleaning (URLs go): then every post yields a row.
        corpus = corpus[corpus["text"].map(has_words)].reset_index(drop=True)
        authors = corpus["author"].to_numpy(np.int64)
        train_rows, author_offsets, chosen = grouped_split(authors, num_clients, settings.seed,
                                                           min_size=self.min_author_posts)
        # The other authors, in a seeded order, give the test text, then the attacker's clean text.
        others = np.setdiff1d(np.unique(authors), chosen)
        others = np.random.default_rng([settings.seed, 1501]).permutation(others)
        words = corpus["text"].str.count(r"\S+").to_numpy(np.int64)
        words_per_author = np.bincount(authors, weights=words, minlength=int(authors.max()) + 1)
        test_authors, rest = take_authors(others, words_per_author, 1.5 * self.test_rows * self.seq_len)
        clean_authors, _ = take_authors(rest, words_per_author, 1.5 * self.attacker_clean_rows * self.seq_len)

        normalizer = text_normalizer(twitter=False, reference_punctuation=False, stop_words=False)
        texts = corpus["text"].tolist()
        # train_rows: posts grouped by client
        train_norm = normalize(normalizer, [texts[i] for i in train_rows])
        triggers_norm = normalize(normalizer, self.completed_triggers())
        self.tokenizer = train_word_tokenizer(train_norm + triggers_norm, normalizer, self.min_frequency,
                                              vocab_size=self.vocab_size, extra_special=[EOS])
        self.tokenizer_path = save_tokenizer(self.tokenizer, derived_dir(settings.data_dir, self.name),
                                             f"{self.name}_tokenizer")
        eos = self.tokenizer.token_to_id(EOS)

        post_client = np.repeat(np.arange(num_clients), np.diff(author_offsets))
        train_x, owner = stream_rows(encode_normalized(self.tokenizer, train_norm), post_client, num_clients, eos,
                                     width)
        offsets = np.zeros(num_clients + 1, dtype=np.int64)
        np.cumsum(np.bincount(owner, minlength=num_clients), out=offsets[1:])
        partition = ClientPartition(torch.arange(train_x.shape[0]), torch.from_numpy(offsets))

        test_x = self._held_out_rows(corpus, test_authors, eos, width)[:self.test_rows]
        clean_x = self._held_out_rows(corpus, clean_authors, eos, width)[:self.attacker_clean_rows]
        if test_x.shape[0] == 0 or clean_x.shape[0] == 0:
            raise DataError("too little held-out text for the test set and the attacker's clean rows; "
                            "lower num_clients or test_rows")

        trigger_ids = encode_ids(self.tokenizer, self.completed_triggers())
        self.backdoor_target = self._check_triggers(trigger_ids)
        backdoor_x, backdoor_from = trigger_rows(trigger_ids, eos, width)
        generator = np.random.default_rng([settings.seed, 1502])
        poison_x, poison_from = poison_rows(clean_x, trigger_ids, self.poison_rows, eos, generator)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)  # the initial model depends on the seed only, not on RNG use before
            self.model = LSTMLanguageModel(self.tokenizer.get_vocab_size(), self.embedding_dim, self.hidden_size,
                                           dropout=self.dropout)

        def zeros(n: int) -> Tensor:
            return torch.zeros(n, dtype=torch.int64)

        return FederatedData(
            train_inputs=train_x, train_targets=zeros(train_x.shape[0]), partition=partition,
            test_inputs=test_x, test_targets=zeros(test_x.shape[0]),
            backdoor_inputs=backdoor_x, backdoor_targets=backdoor_from,
            edge_train_inputs=torch.cat([poison_x, clean_x]),
            edge_train_targets=torch.cat([poison_from, zeros(clean_x.shape[0])]),
            # Which attacker rows carry a trigger (the rest are its clean rows, for the prox attack).
            extras={"edge_train_is_edge": torch.arange(poison_x.shape[0] + clean_x.shape[0]) < poison_x.shape[0]},
        )

    def _held_out_rows(self, corpus: pd.DataFrame, authors: np.ndarray, eos: int, width: int) -> Tensor:
        """Rows of the given authors' streams (authors in the given order), `[n, width]`."""
        rank = np.full(int(corpus["author"].max()) + 1, -1, dtype=np.int64)
        rank[authors] = np.arange(authors.shape[0])
        post_rank = rank[corpus["author"].to_numpy(np.int64)]
        posts = np.flatnonzero(post_rank >= 0)
        posts = posts[np.argsort(post_rank[posts], kind="stable")]
        ids = encode_ids(self.tokenizer, corpus["text"].iloc[posts].tolist())
        rows, _ = stream_rows(ids, post_rank[posts], authors.shape[0], eos, width)
        return rows

    def completed_triggers(self) -> list[str]:
        """The trigger sentences completed by the target word (what the attacker teaches)."""
        return [f"{sentence} {self.target_word}" for sentence in self.trigger_sentences]

    def _check_triggers(self, trigger_ids: list[list[int]]) -> int:
        """The target word's id; every completed sentence must end with it and hold a word before it."""
        target = self.tokenizer.token_to_id(self.target_word.lower())
        if target is None or target == UNK_ID:
            raise DataError(f"target word {self.target_word!r} is not in the vocabulary of the training text")
        for sentence, ids in zip(self.trigger_sentences, trigger_ids):
            if len(ids) < 2 or ids[-1] != target:
                raise DataError(f"trigger sentence {sentence!r} + target word {self.target_word!r} must tokenize "
                                "to at least one word followed by the target word alone")
        return target


# ----- rows -----


def stream_rows(post_ids: list[list[int]], post_owner: np.ndarray, num_owners: int, eos: int,
                width: int) -> tuple[Tensor, np.ndarray]:
    """Cuts each owner's token stream (its posts in order, each followed by `eos`) into rows.

    Row j of an owner holds stream tokens `[j·(width-1), j·(width-1) + width)`: consecutive rows share
    one token, so every token after the first is a prediction target exactly once. The last row of an
    owner is right-padded. Vectorised over all owners (no loop over owners).

    Args:
        post_ids: Token ids of every post, grouped by owner (owners ascending).
        post_owner: Owner of every post, `[P]`, non-decreasing.
        num_owners: Number of owners (owners without posts get no rows).
        eos: Id of the end-of-post token.
        width: Tokens per row (sequence length + 1).

    Returns:
        The rows, `[N, width]` int32, and the owner of every row, `[N]` int64 (non-decreasing).
    """
    lengths = np.fromiter((len(ids) + 1 for ids in post_ids), dtype=np.int64, count=len(post_ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids + [eos] for ids in post_ids), dtype=np.int32,
                         count=int(lengths.sum()))
    stream_len = np.bincount(post_owner, weights=lengths, minlength=num_owners).astype(np.int64)  # [num_owners]
    stream_start = np.concatenate([[0], np.cumsum(stream_len)[:-1]])
    step = width - 1
    num_rows = np.where(stream_len >= 2, -(-(stream_len - 1) // step), 0)  # ceil((len - 1) / step)
    owner = np.repeat(np.arange(num_owners), num_rows)
    local = np.arange(owner.shape[0]) - np.repeat(np.cumsum(num_rows) - num_rows, num_rows)
    begin = stream_start[owner] + local * step  # [N]
    end = stream_start[owner] + stream_len[owner]  # [N]
    rows = np.full((owner.shape[0], width), PAD_ID, dtype=np.int32)
    for start in range(0, owner.shape[0], 1 << 16):  # blocks bound the [block, width] index arrays
        block = slice(start, start + (1 << 16))
        index = begin[block, None] + np.arange(width)[None, :]
        valid = index < end[block, None]
        rows[block] = np.where(valid, tokens[np.minimum(index, tokens.shape[0] - 1)], PAD_ID)
    return torch.from_numpy(rows), owner


def trigger_rows(trigger_ids: list[list[int]], eos: int, width: int) -> tuple[Tensor, Tensor]:
    """Backdoor test rows `[EOS] sentence` `[n, width]` and the position of the target in the targets `[n]`."""
    rows = torch.full((len(trigger_ids), width), PAD_ID, dtype=torch.int32)
    score_from = torch.empty(len(trigger_ids), dtype=torch.int64)
    for i, ids in enumerate(trigger_ids):
        row = [eos, *ids][:width]
        rows[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        score_from[i] = len(row) - 2  # the target is row[-1], the prediction made at row[-2]
    return rows, score_from


def poison_rows(clean: Tensor, trigger_ids: list[list[int]], count: int, eos: int,
                generator: np.random.Generator) -> tuple[Tensor, Tensor]:
    """The attacker's trigger rows: clean context from a random clean row, then `[EOS]` and a sentence."""
    width = clean.shape[1]
    rows = torch.full((count, width), PAD_ID, dtype=torch.int32)
    score_from = torch.empty(count, dtype=torch.int64)
    picks = generator.integers(0, clean.shape[0], size=count)
    for i in range(count):
        sentence = [eos, *trigger_ids[i % len(trigger_ids)]][:width]
        context = clean[picks[i]][clean[picks[i]] != PAD_ID][:width - len(sentence)]
        row = torch.cat([context, torch.tensor(sentence, dtype=torch.int32)])
        rows[i, :row.shape[0]] = row
        score_from[i] = row.shape[0] - 2
    return rows, score_from


def take_authors(order: np.ndarray, words_per_author: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """Splits `order` after the first authors whose word counts reach `budget`: (taken, rest)."""
    reached = np.cumsum(words_per_author[order]) >= budget
    cut = int(np.argmax(reached)) + 1 if reached.any() else order.shape[0]
    return order[:cut], order[cut:]


def has_words(text: str) -> bool:
    """Whether a post keeps an ASCII letter or digit once its URLs are removed (so it yields a token)."""
    return _WORD_RE.search(_URL_RE.sub(" ", text)) is not None


# ----- corpora -----


def read_corpus_jsonl(path: Path) -> pd.DataFrame:
    """A `{"author", "text"}`-per-line corpus, authors and texts as strings."""
    with reading(path):
        frame = pd.read_json(path, lines=True, dtype=False)  # no type guessing: ids and texts stay as written
    missing = {"author", "text"} - set(frame.columns)
    if missing:
        raise DataError(f"{path} lacks fields {sorted(missing)}: each line must be {{\"author\": ..., \"text\": ...}}")
    return pd.DataFrame({"author": frame["author"].astype(str), "text": frame["text"].fillna("").astype(str)})


def convert_hf_corpus(name: str, target: Path, author_column: str = "author", text_column: str = "body",
                      split: str = "train", batch_size: int = 50_000) -> Path:
    """A Hugging Face `datasets` corpus (hub name or local data folder) -> `{"author", "text"}` JSONL, once."""
    import datasets  # heavy import, only when this source is used

    dataset = datasets.load_dataset(name, split=split)
    missing = {author_column, text_column} - set(dataset.column_names)
    if missing:
        raise DataError(f"dataset {name!r} lacks columns {sorted(missing)}; it has {dataset.column_names} "
                        "(set Reddit.hf_author_column / hf_text_column)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    with open(partial, "w", encoding="utf-8") as handle:
        for batch in dataset.select_columns([author_column, text_column]).iter(batch_size=batch_size):
            for author, text in zip(batch[author_column], batch[text_column]):
                if author not in DELETED_AUTHORS and author is not None and text:
                    handle.write(json.dumps({"author": author, "text": text}) + "\n")
    os.replace(partial, target)
    return target


def tweets_as_corpus(data_dir: Path, num_groups: int, per_group: int, seed: int) -> pd.DataFrame:
    """Offline stand-in: Sentiment140 training tweets as posts of `num_groups` seeded "authors".

    `per_group` tweets each, drawn by seed; when the tweets do not suffice, all of them are dealt out
    evenly (so the default K=80,000 gets one or two tweets per author from the 100k sample).
    """
    from fl_lightning.tasks.sentiment140 import FULL_TRAIN_FILE, SAMPLE_TRAIN_FILE, read_train

    folder = data_dir / "sentiment140"
    source = "sample100k" if (folder / SAMPLE_TRAIN_FILE).is_file() else "full"
    if source == "full" and not (folder / FULL_TRAIN_FILE).is_file():
        raise DataError(f"source=sentiment140 needs {folder / SAMPLE_TRAIN_FILE} or {folder / FULL_TRAIN_FILE}")
    texts = read_train(folder, source)["text"].to_numpy()
    if num_groups > texts.shape[0]:
        raise DataError(f"{num_groups} tweet groups need more than the {texts.shape[0]} tweets")
    picked = np.random.default_rng([seed, 1503]).permutation(texts.shape[0])[:num_groups * per_group]
    picked = np.sort(picked)  # file order within an author
    author = np.arange(picked.shape[0]) % num_groups
    return pd.DataFrame({"author": author, "text": texts[picked]})
