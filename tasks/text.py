"""The text pipeline shared by the `sentiment140` and `reddit` tasks: cleaning, word-level tokenizer, partitions.

Everything that turns raw text into token ids lives in a Hugging Face `tokenizers` `Tokenizer`: the
cleaning steps are its normalizer, the word split its pre-tokenizer, the vocabulary its `WordLevel`
model. The tokenizer is trained on the training text only (no test-set words: the reference's
vocabulary also read the test set, L10 in `docs/reference-deviations.md`), and written as one JSON file that reproduces
the whole pipeline (`Tokenizer.from_file`), so a run's token ids can always be decoded again.

Cleaning (the reference's `build_twitter_dataset.py`, Wang et al., "Attack of the Tails: Yes, You
Really Can Backdoor Federated Learning", NeurIPS 2020), rebuilt without NLTK or `tweet-preprocessor`,
so nothing is downloaded at run time:

1. HTML entities of the raw Sentiment140 file (`&quot;`, `&amp;`, `&lt;`, `&gt;`) are decoded
   (deviation: the reference leaves them, so `quot` became a word).
2. URLs are removed; with `twitter=True` also what `tweet-preprocessor`'s `clean` removes:
   @mentions, #hashtags, the reserved words RT/FAV, smileys and stand-alone numbers.
3. With `reference_punctuation=True`: ':', '"', ',' and '.' become spaces (the reference's extra steps).
4. Non-ASCII runs become a space (this also drops emoji and the `â€¦` mojibake), then lower-casing.
5. With `stop_words=True`: NLTK's English stop-word list (`ENGLISH_STOP_WORDS`, the same 179
   words, built in) is removed. It contains negations ("not", "no", "don't"): removing them, as the
   reference does, costs some sentiment signal; the list is kept for fidelity.

Words are then runs of `[a-z0-9]` with inner apostrophes ("can't", "i'm" stay one word, where NLTK's
Treebank tokenizer gives "ca", "n't") and single punctuation characters.

Saved tokenizers go to `<data_dir>/derived/<task>/<task>_tokenizer_<sha12>.json` when the data root is
writable, else to `~/.cache/fl_lightning/derived/<task>/` (the offline data root is read-only); the
name carries a hash of the content, so runs with different vocabularies never overwrite each other.
The task keeps the path in `task.tokenizer_path`, and the orchestrator copies it into the run
directory (`Task.artifacts`).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from torch import Tensor

from fl_lightning.config import ConfigError
from fl_lightning.data import DEFAULT_DATA_DIR

PAD = "[PAD]"
UNK = "[UNK]"
EOS = "[EOS]"
PAD_ID = 0  # the special tokens are added first, in this order, so their ids are fixed
UNK_ID = 1

# NLTK's `stopwords.words("english")` (179 words), written out so that no corpus is downloaded.
ENGLISH_STOP_WORDS: frozenset[str] = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
that that'll these those am is are was were be been being have has had having do does did doing a an the and but
if or because as until while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don don't should
should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
weren weren't won won't wouldn wouldn't
""".split())

# A word is a run of ASCII letters/digits with inner apostrophes; anything else non-blank is one character.
WORD_PATTERN = r"[a-z0-9]+(?:'[a-z0-9]+)*|[^\sa-z0-9]"
_HTML_ENTITIES = (("&quot;", '"'), ("&lt;", "<"), ("&gt;", ">"), ("&amp;", "&"))  # &amp; last: no double decoding
_URL = r"(?:https?://|www\.)\S+"
_MENTION = r"@\w+"
_HASHTAG = r"#\w+"
_RESERVED = r"\b(?:RT|FAV)\b"  # case-sensitive, as tweet-preprocessor: before lower-casing
_SMILEY = r"(?<!\w)[:;=8xX][-o'^]?[)(\]\[DPpOo/\\|*3]+(?!\w)"
_NUMBER = r"(?<![\w'])[-+]?\d+(?:[.,:]\d+)*(?![\w'])"


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex alternation of `words` as a prefix tree (`a(?:bout|gain)?|...`): one pass per position, far
    cheaper than trying 179 alternatives in turn."""
    tree: dict = {}
    for word in words:
        node = tree
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # end of a word

    def emit(node: dict) -> str:
        branches = [re.escape(char) + emit(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        return "(?:" + "|".join(branches) + ")" + ("?" if "" in node else "")

    return emit(tree)


def text_normalizer(twitter: bool, reference_punctuation: bool, stop_words: bool) -> normalizers.Normalizer:
    """The cleaning steps of the module docstring as a `tokenizers` normalizer.

    Everything that becomes a blank is one regex alternation (one pass instead of one per step; the
    alternatives are tried in the order of the module docstring at each position, so a smiley wins
    over its ':' and a number over its '.').

    Args:
        twitter: Remove @mentions, #hashtags, RT/FAV, smileys and stand-alone numbers (tweet-preprocessor's `clean`).
        reference_punctuation: Replace ':', '"', ',' and '.' with spaces (the Sentiment140 reference's extra steps).
        stop_words: Remove `ENGLISH_STOP_WORDS`.
    """
    blanks = [_URL, *((_MENTION, _HASHTAG, _RESERVED, _SMILEY, _NUMBER) if twitter else ())]
    if reference_punctuation:
        blanks.append(r"[:\",.]")
    blanks.append(r"[^\x00-\x7F]+")
    steps: list[normalizers.Normalizer] = [normalizers.Replace(entity, char) for entity, char in _HTML_ENTITIES]
    steps += [normalizers.Replace(Regex("|".join(blanks)), " "), normalizers.Lowercase()]
    if stop_words:
        # Bounded by anything that is not a word character or an apostrophe, so "don" never eats the
        # start of "don't" and "i" never the start of "i'm".
        steps.append(normalizers.Replace(Regex(r"(?<![\w'])" + _trie_pattern(ENGLISH_STOP_WORDS) + r"(?![\w'])"),
                                         " "))
    return normalizers.Sequence(steps)


def word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Splits on blanks, then into `WORD_PATTERN` pieces (words and single punctuation characters)."""
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")])


def normalize(normalizer: normalizers.Normalizer, texts: Iterable[str]) -> list[str]:
    """Cleans each text once; train and encode on the result (`train_word_tokenizer`, `encode_normalized`)
    so that the costly cleaning never runs twice on the same text."""
    return [normalizer.normalize_str(text) for text in texts]


def count_words(normalized: Sequence[str]) -> np.ndarray:
    """Tokens per cleaned text (before any vocabulary), `[N]` int64."""
    split = word_pre_tokenizer()
    return np.fromiter((len(split.pre_tokenize_str(text)) for text in normalized), dtype=np.int64,
                       count=len(normalized))


def train_word_tokenizer(normalized: Iterable[str], normalizer: normalizers.Normalizer, min_frequency: int,
                         vocab_size: int | None = None, extra_special: Sequence[str] = ()) -> Tokenizer:
    """Trains a word-level tokenizer on cleaned text; `[PAD]` gets id 0 and `[UNK]` id 1.

    Args:
        normalized: The training text, already cleaned by `normalizer` (`normalize`); never test text:
            its words must map to `[UNK]`.
        normalizer: The cleaning; installed in the returned tokenizer, which therefore encodes raw text.
        min_frequency: Words seen fewer times map to `[UNK]` (so `[UNK]` is trained, and a rare test word
            meets a trained embedding rather than a random one).
        vocab_size: Keep at most this many entries, most frequent first (None: no cap).
        extra_special: More special tokens after `[PAD]` and `[UNK]` (e.g. `[EOS]`).
    """
    tokenizer = Tokenizer(WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([])  # the text is clean already
    tokenizer.pre_tokenizer = word_pre_tokenizer()
    trainer = WordLevelTrainer(vocab_size=vocab_size or 2**31 - 1, min_frequency=min_frequency, show_progress=False,
                               special_tokens=[PAD, UNK, *extra_special])
    tokenizer.train_from_iterator(normalized, trainer)
    if tokenizer.token_to_id(PAD) != PAD_ID or tokenizer.token_to_id(UNK) != UNK_ID:
        raise RuntimeError("tokenizers did not put [PAD], [UNK] first; the padding logic depends on it")
    tokenizer.normalizer = normalizer
    return tokenizer


def encode_ids(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of raw texts (cleaned by the tokenizer's normalizer), no padding or truncation."""
    return [enc.ids for enc in tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]


def encode_normalized(tokenizer: Tokenizer, normalized: Sequence[str]) -> list[list[int]]:
    """Token ids of texts cleaned already (`normalize`): the same ids as `encode_ids` on the raw texts."""
    bare = Tokenizer.from_str(tokenizer.to_str())
    bare.normalizer = normalizers.Sequence([])
    return encode_ids(bare, normalized)


def pad_right(ids: Sequence[Sequence[int]], length: int) -> tuple[Tensor, Tensor]:
    """Right-pads (with `PAD_ID`) or truncates (keeping the first `length` tokens) to a fixed length.

    Right padding keeps a causal LSTM's state at every real token independent of the padding (left
    padding, as in the reference, feeds the pads through the LSTM first, and its biases move the state).

    Returns:
        The ids, `[N, length]` int32, and the kept lengths, `[N]` int64.
    """
    out = np.full((len(ids), length), PAD_ID, dtype=np.int32)
    lengths = np.fromiter((min(len(row), length) for row in ids), dtype=np.int64, count=len(ids))
    for i, row in enumerate(ids):
        out[i, :lengths[i]] = row[:length]
    return torch.from_numpy(out), torch.from_numpy(lengths)


def derived_dir(data_dir: Path, task_name: str) -> Path:
    """Where derived files (tokenizers) go: `<data_dir>/derived/<task>`, or the user cache for a read-only root.

    Read-only is judged by the permission bits too, not only `os.access`: as root, `os.access` says
    yes to a folder that was made read-only on purpose (the shared offline copy).
    """
    data_dir = Path(data_dir)
    root = data_dir / "derived"
    probe = root if root.exists() else data_dir
    writable = os.access(probe, os.W_OK) and bool(probe.stat().st_mode & stat.S_IWUSR)
    folder = (root if writable else DEFAULT_DATA_DIR.expanduser() / "derived") / task_name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_tokenizer(tokenizer: Tokenizer, directory: Path, stem: str) -> Path:
    """Writes the tokenizer JSON atomically as `<stem>_<sha12>.json` in `directory`; returns its path."""
    payload = tokenizer.to_str()
    path = Path(directory) / f"{stem}_{hashlib.sha256(payload.encode()).hexdigest()[:12]}.json"
    if not path.exists():
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")  # one temp name per process: ranks may race
        partial.write_text(payload, encoding="utf-8")
        os.replace(partial, path)
    return path


def lstm_hidden_size(model: str | None, default: int = 200) -> int:
    """Hidden size from a model variant name: `None` gives `default`, `lstm_h<H>` gives H (e.g. `lstm_h100`)."""
    if model is None:
        return default
    match = re.fullmatch(r"lstm_h([1-9]\d*)", model)
    if match is None:
        raise ConfigError(f"--model={model!r}: unknown model for the text tasks; allowed: `lstm_h<hidden size>`, "
                          "e.g. `lstm_h200` (the default) or `lstm_h100`")
    return int(match.group(1))
