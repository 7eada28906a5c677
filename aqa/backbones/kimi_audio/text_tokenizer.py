"""Kimi-Audio's text tokenizer: the release's ``tiktoken.model`` read without its remote code.

The release ships ``tiktoken.model`` (one ``base64(token bytes) rank`` per line: the byte-level BPE,
151,643 ranks for the 7B) and ``tokenizer_config.json`` whose ``added_tokens_decoder`` names the
special tokens and their ids. Its ``tokenization_kimia.py`` (remote code) wraps the ``tiktoken``
package; we implement the same rank-based byte-pair merge here, so no extra dependency is needed:
a piece is split into bytes and the adjacent pair whose concatenation has the lowest rank is merged
until no pair is a token. Pieces come from the Qwen2 pre-tokenizer pattern (the vocabulary is
Qwen2.5's); a ``pat_str`` in ``tokenizer_config.json`` overrides it.

Special tokens are never parsed out of text: the prompt builder inserts their ids directly, so a
question that happens to contain ``<|im_msg_end|>`` stays plain text.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path

import regex

VOCAB_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"

# Qwen2's split pattern (letters with an optional leading mark, single digits, punctuation runs,
# newline runs, whitespace), as tiktoken-based Qwen/Kimi-Audio tokenizers use it.
QWEN2_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def byte_pair_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Ranks of the BPE tokens of one pre-tokenized ``piece`` (tiktoken's merge rule).

    Every single byte must be a token (true of any byte-level vocabulary).
    """
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    try:
        return [ranks[p] for p in parts]
    except KeyError as err:
        raise ValueError(f"byte {err.args[0]!r} is not in the BPE vocabulary: it is not byte-level.") from None


class KimiTextTokenizer:
    """Encode/decode text with a tiktoken-format BPE; special tokens by name from tokenizer_config.json."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], pat_str: str = QWEN2_PAT_STR):
        self.ranks = ranks
        self.special_tokens = dict(special_tokens)
        self.pat_str = pat_str
        self._pattern = regex.compile(pat_str)
        self._decoder = {rank: token for token, rank in ranks.items()}
        self._special_ids = {i: name for name, i in self.special_tokens.items()}
        self.num_base_tokens = len(ranks)
        clash = sorted(i for i in self._special_ids if i in self._decoder)
        if clash:
            raise ValueError(f"special token ids {clash[:5]} are also BPE ranks; the tokenizer files disagree.")
        # merges repeat across prompts (the same question words); memoise per piece
        self._merge = lru_cache(maxsize=65536)(lambda piece: tuple(byte_pair_merge(piece, self.ranks)))

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> KimiTextTokenizer:
        """Read ``tiktoken.model`` and ``tokenizer_config.json`` from a release directory."""
        path = Path(path)
        vocab_file = path / VOCAB_FILE
        if not vocab_file.is_file():
            raise FileNotFoundError(
                f"{path} has no {VOCAB_FILE}: a Kimi-Audio release directory holds the text tokenizer as "
                f"{VOCAB_FILE} + {CONFIG_FILE}; copy them from the HF repo moonshotai/Kimi-Audio-7B-Instruct."
            )
        ranks: dict[bytes, int] = {}
        for n, line in enumerate(vocab_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{vocab_file}:{n}: expected 'base64-token rank', got {line[:60]!r}.")
            ranks[base64.b64decode(fields[0])] = int(fields[1])
        specials: dict[str, int] = {}
        pat_str = QWEN2_PAT_STR
        config_file = path / CONFIG_FILE
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            for token_id, info in config.get("added_tokens_decoder", {}).items():
                specials[info["content"]] = int(token_id)
            pat_str = config.get("pat_str", pat_str)
        return cls(ranks, specials, pat_str)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write ``tiktoken.model`` and ``tokenizer_config.json`` as the release lays them out."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}" for tok, rank in
                 sorted(self.ranks.items(), key=lambda kv: kv[1])]
        (out / VOCAB_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = {
            "tokenizer_class": "TikTokenTokenizer",
            "pat_str": self.pat_str,
            "added_tokens_decoder": {
                str(i): {"content": name, "special": True} for i, name in sorted(self._special_ids.items())
            },
        }
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # -- text ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids (no BOS/EOS, special-token names stay text), as ``encode(bos=False, eos=False)``."""
        ids: list[int] = []
        for piece in self._pattern.findall(text):
            ids.extend(self._merge(piece.encode("utf-8")))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text. Ids outside the BPE vocabulary (audio codes) and specials are dropped when skipping."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i in self._decoder:
                out += self._decoder[i]
            elif not skip_special_tokens and i in self._special_ids:
                out += self._special_ids[i].encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def token_id(self, name: str) -> int:
        """Id of a special token by its name (e.g. ``<|im_media_begin|>``)."""
        if name not in self.special_tokens:
            raise KeyError(f"special token {name} is not in {CONFIG_FILE}'s added_tokens_decoder.")
        return self.special_tokens[name]


def train_byte_bpe(corpus: list[str], vocab_size: int, pat_str: str = QWEN2_PAT_STR) -> dict[bytes, int]:
    """A small byte-level BPE in tiktoken form (token bytes -> rank), learned greedily from ``corpus``.

    Ranks 0..255 are the single bytes; each merge adds the most frequent adjacent pair (ties broken
    by the bytes, so the result is deterministic). Used for tiny models only.
    """
    if vocab_size < 256:
        raise ValueError(f"a byte-level BPE needs at least 256 tokens, got vocab_size={vocab_size}.")
    ranks = {bytes([b]): b for b in range(256)}
    pattern = regex.compile(pat_str)
    words: dict[tuple[bytes, ...], int] = {}
    for text in corpus:
        for piece in pattern.findall(text):
            key = tuple(bytes([b]) for b in piece.encode("utf-8"))
            words[key] = words.get(key, 0) + 1
    while len(ranks) < vocab_size:
        pairs: dict[tuple[bytes, bytes], int] = {}
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        if merged not in ranks:  # the same bytes may be reached by two different pairs
            ranks[merged] = len(ranks)
        new_words: dict[tuple[bytes, ...], int] = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + count
        words = new_words
    return ranks
