"""Tokenizers: GPT-2 BPE (shipped), and any tokenizer.json, SentencePiece .model or tiktoken BPE file.

    name     files                             loaded with        document boundary   papers
    gpt2     data/assets/gpt2.tiktoken         tiktoken           <|endoftext|> after  nanoGPT, MARS-M, Muon-NSR Suite A
    t5       t5-base tokenizer.json / .model   tokenizers / spm   </s> after           GaLore, Muon² (C4)
    llama2   Llama-2 tokenizer.json / .model   tokenizers / spm   <s> before           Muon-NSR Suite B
    llama3   Llama-3 tokenizer.json            tokenizers         <|begin_of_text|> before   Marin
    file     tokenizer.path=<file or dir>      by its suffix      the config's

A `tokenizer` config (configs/tokenizer/*.yaml) names the files: `path` (a local file, or a directory
holding one of them), else the hub repo `hub` where the network allows it. Text is encoded without
special tokens; each document's boundary tokens are added by data/prepare.py (`data.eot`, by default the
tokenizer's own `eot`: "append" its `eos_token`, "prepend" its `bos_token`, "both"), as the papers'
code gets them from the HF tokenizer's post-processor. `gpt2.tiktoken` is byte-identical to tiktoken's `r50k_base.tiktoken`
(from the openai-whisper sdist, MIT); building the Encoding from it needs no network.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ASSETS = Path(__file__).parent / "assets"
RANKS_FILE = ASSETS / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base hash
EOT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257
EOT_PLACEMENTS = ("append", "prepend", "both")
FILE_KINDS = {".json": "tokenizers", ".model": "sentencepiece", ".tiktoken": "tiktoken"}  # by suffix
DIRECTORY_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "tokenizer.tiktoken")  # looked for in a dir
BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece's byte fallback


class TokenizerError(RuntimeError):
    pass


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def gpt2_tokenizer():
    """The GPT-2 encoding (tiktoken): n_vocab 50257, <|endoftext|> = 50256, "hello world" -> [31373, 995]."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    if not RANKS_FILE.is_file():
        raise TokenizerError(f"the GPT-2 ranks file {RANKS_FILE} is missing; restore it from git (data/assets)")
    try:
        ranks = load_tiktoken_bpe(str(RANKS_FILE), expected_hash=RANKS_SHA256)
    except ValueError as e:  # tiktoken raises ValueError on a hash mismatch
        raise TokenizerError(f"{RANKS_FILE} does not have the GPT-2 sha256 {RANKS_SHA256}: {e}") from None
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: EOT_ID}, explicit_n_vocab=N_VOCAB
    )


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer: text to ids without special tokens, and the ids data/prepare.py adds."""

    name: str
    kind: str
    files: tuple[Path, ...]
    bos_id: int | None          # prepended to each document (data.eot=prepend or both)
    eos_id: int | None          # appended to each document (data.eot=append or both)
    pad_id: int | None          # what unpacked sequences are padded with (masked out of the loss)
    text_ids: int               # ids [0, text_ids) are those text can encode to
    encode_batch: Callable[[list[str]], list[list[int]]]
    decode: Callable[[list[int]], str]
    piece_bytes: Callable[[], np.ndarray]  # UTF-8 bytes each id stands for (0: special tokens)

    @property
    def max_id(self) -> int:
        """The largest id a prepared corpus can hold: text's, a boundary token's or the pad's."""
        return max(self.text_ids - 1, *(i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None))

    def boundary(self, eot: str) -> tuple[list[int], list[int]]:
        """The ids before and after each document for data.eot = "append", "prepend" or "both"."""
        if eot not in EOT_PLACEMENTS:
            raise TokenizerError(f"data.eot={eot!r} is not one of {list(EOT_PLACEMENTS)}")
        before = [self.bos_id] if eot in ("prepend", "both") else []
        after = [self.eos_id] if eot in ("append", "both") else []
        if None in before + after:
            missing = "bos_token" if None in before else "eos_token"
            raise TokenizerError(f"data.eot={eot} needs tokenizer.{missing}, which tokenizer={self.name} does not set")
        return before, after

    def padding(self) -> int:
        """The id unpacked rows are padded with (data.packing=false); an error if the tokenizer has none."""
        if self.pad_id is None:
            raise TokenizerError(f"data.packing=false pads every document: tokenizer={self.name} has no pad token "
                                 f"(set tokenizer.pad_token, or data.packing=true)")
        return self.pad_id

    @property
    def dtype(self) -> np.dtype:
        """Shards store 2-byte tokens up to id 65,535 and 4-byte ones beyond (LLaMA-3's 128,256)."""
        return np.dtype("<u2") if self.max_id <= np.iinfo(np.uint16).max else np.dtype("<u4")

    def document_token(self, eot: str) -> int:
        """The id that marks each document under data.eot=`eot` (its EOS, else its BOS): documents are counted by it."""
        before, after = self.boundary(eot)
        return (after or before)[0]

    def identity(self) -> dict:
        """What makes two tokenizers the same: their files' sha256 and special ids (meta.json, cache names)."""
        return {"name": self.name, "kind": self.kind, "sha256": [file_sha256(f) for f in self.files],
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "text_ids": self.text_ids}


def _gpt2(cfg: Mapping) -> Tokenizer:
    enc = gpt2_tokenizer()
    return Tokenizer("gpt2", "tiktoken", (RANKS_FILE,), EOT_ID, EOT_ID, None, EOT_ID,
                     lambda texts: enc.encode_ordinary_batch(texts), enc.decode,
                     lambda: np.array([len(enc.decode_single_token_bytes(i)) for i in range(EOT_ID)] + [0], dtype=np.int64))


def _tiktoken(path: Path, cfg: Mapping) -> Tokenizer:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    if not cfg.get("pattern"):
        raise TokenizerError(f"tokenizer.path={path} is a tiktoken BPE file: set tokenizer.pattern to its pre-tokenizer "
                             f"regex (tiktoken files do not hold it)")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:
        raise TokenizerError(f"tokenizer.path={path} does not parse as a tiktoken BPE file ({type(e).__name__}: {e})") from None
    n_text = max(ranks.values()) + 1  # special tokens follow the ranks, in the order bos, eos, pad
    names = [cfg.get(k) for k in ("bos_token", "eos_token", "pad_token")]
    specials = {name: n_text + i for i, name in enumerate(dict.fromkeys(n for n in names if n))}
    enc = tiktoken.Encoding(name=path.stem, pat_str=cfg["pattern"], mergeable_ranks=ranks, special_tokens=specials)
    bos, eos, pad = (specials.get(n) if n else None for n in names)
    return Tokenizer(cfg["name"], "tiktoken", (path,), bos, eos, pad, n_text,
                     lambda texts: enc.encode_ordinary_batch(texts), enc.decode,
                     lambda: np.array([len(enc.decode_single_token_bytes(i)) for i in range(n_text)] + [0], dtype=np.int64))


def _special_id(lookup: Callable[[str], int | None], token: str | None, path: Path, what: str) -> int | None:
    if token is None:
        return None
    found = lookup(token)
    if found is None:
        raise TokenizerError(f"{path} has no token {token!r} (tokenizer.{what}); set tokenizer.{what} to one of its special tokens")
    return found


def _tokenizers(path: Path, cfg: Mapping) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"tokenizer.path={path} does not parse as a tokenizer.json ({type(e).__name__}: {e})") from None
    bos, eos, pad = (_special_id(tok.token_to_id, cfg.get(k), path, k) for k in ("bos_token", "eos_token", "pad_token"))
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    text_ids = max((i for t, i in tok.get_vocab(with_added_tokens=False).items() if t not in specials), default=-1) + 1

    def piece_bytes() -> np.ndarray:
        byte_level = "ByteLevel" in type(tok.pre_tokenizer).__name__ or '"ByteLevel"' in tok.to_str()[:100_000]
        decoder = {c: b for b, c in _bytes_to_unicode().items()}
        out = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
        for i in range(text_ids):
            piece = tok.id_to_token(i)
            if piece is None or piece in specials:
                continue
            out[i] = _piece_length(piece, decoder if byte_level else None)
        return out

    return Tokenizer(cfg["name"], "tokenizers", (path,), bos, eos, pad, text_ids,
                     lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
                     lambda ids: tok.decode(ids, skip_special_tokens=False), piece_bytes)


def _sentencepiece(path: Path, cfg: Mapping) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise TokenizerError(f"tokenizer.path={path} does not parse as a SentencePiece model ({type(e).__name__}: {e})") from None
    lookup = lambda token: sp.piece_to_id(token) if sp.piece_to_id(token) != sp.unk_id() or token == sp.id_to_piece(sp.unk_id()) else None  # noqa: E731
    bos, eos, pad = (_special_id(lookup, cfg.get(k), path, k) for k in ("bos_token", "eos_token", "pad_token"))

    def piece_bytes() -> np.ndarray:
        return np.array([0 if sp.is_control(i) or sp.is_unknown(i) else _piece_length(sp.id_to_piece(i), None)
                         for i in range(sp.get_piece_size())], dtype=np.int64)

    return Tokenizer(cfg["name"], "sentencepiece", (path,), bos, eos, pad, sp.get_piece_size(),
                     lambda texts: sp.encode(texts), lambda ids: sp.decode(ids), piece_bytes)


def _piece_length(piece: str, byte_decoder: dict | None) -> int:
    """UTF-8 bytes of one vocabulary piece: byte-level BPE's mapped characters, SentencePiece's ▁ for a
    space and <0xNN> byte fallbacks."""
    if byte_decoder is not None:
        return sum(1 for c in piece if c in byte_decoder) or len(piece.encode())
    if BYTE_PIECE.match(piece):
        return 1
    return len(piece.replace("▁", " ").encode())


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte as a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


LOADERS = {"tiktoken": _tiktoken, "tokenizers": _tokenizers, "sentencepiece": _sentencepiece}


def tokenizer_file(cfg: Mapping) -> Path:
    """The tokenizer's file: `path` (a file, or a directory holding tokenizer.json, tokenizer.model,
    spiece.model or tokenizer.tiktoken), else `hub_file` of the hub repo `hub` (network)."""
    if cfg.get("path"):
        path = Path(cfg["path"]).expanduser()
        if path.is_dir():
            found = [path / f for f in DIRECTORY_FILES if (path / f).is_file()]
            if not found:
                raise TokenizerError(f"tokenizer.path={path} holds none of {list(DIRECTORY_FILES)}")
            return found[0]
        if not path.is_file():
            raise TokenizerError(f"tokenizer.path={path} does not exist (a tokenizer.json, SentencePiece .model or tiktoken "
                                 f"file, or a directory holding one)")
        return path
    if not cfg.get("hub"):
        raise TokenizerError(f"tokenizer={cfg['name']} needs its file: pass tokenizer.path=<a tokenizer.json, .model or "
                             f".tiktoken file, or a directory holding one>")
    from data.hf import hub_reachable

    why = hub_reachable()
    if why:
        raise TokenizerError(f"tokenizer={cfg['name']} loads {cfg['hub_file']} from the hub repo {cfg['hub']}, which is not "
                             f"reachable ({why}): download it elsewhere and pass tokenizer.path=<that file or its directory>")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(cfg["hub"], cfg["hub_file"]))
    except Exception as e:  # gated repos (LLaMA) need a login: say so, with the offline way out
        raise TokenizerError(f"tokenizer={cfg['name']}: cannot download {cfg['hub_file']} from {cfg['hub']} ({type(e).__name__}: "
                             f"{e}); pass tokenizer.path=<a local copy>") from None


def load_tokenizer(cfg: Mapping | None = None) -> Tokenizer:
    """The tokenizer a `tokenizer` config names (None: GPT-2), loaded once per process."""
    return _load(json.dumps(dict(cfg or {"name": "gpt2"}), sort_keys=True, default=str))


@functools.cache
def _load(key: str) -> Tokenizer:
    cfg = json.loads(key)
    if cfg["name"] == "gpt2" and not cfg.get("path"):
        return _gpt2(cfg)
    path = tokenizer_file(cfg)
    kind = next((k for suffix, k in FILE_KINDS.items() if path.name.endswith(suffix)), None)
    if kind is None:
        raise TokenizerError(f"tokenizer.path={path}: unknown tokenizer file type (expected {sorted(FILE_KINDS)})")
    return LOADERS[kind](path, cfg)


def write_tokenizer_files(cfg: Mapping | None, out_dir: Path) -> list[Path]:
    """Copy the tokenizer's files into out_dir (an exported model's directory), under their usual names.
    GPT-2's shipped ranks are written as the vocab.json + merges.txt that transformers' GPT2TokenizerFast reads."""
    import shutil

    tokenizer, out_dir = load_tokenizer(cfg), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer.name == "gpt2" and tokenizer.files == (RANKS_FILE,):
        return _write_gpt2_vocab(out_dir)
    source = tokenizer.files[0]
    target = out_dir / {"tokenizers": "tokenizer.json", "sentencepiece": "tokenizer.model"}.get(tokenizer.kind, source.name)
    shutil.copyfile(source, target)
    return [target]


def _write_gpt2_vocab(out_dir: Path) -> list[Path]:
    """vocab.json and merges.txt of GPT-2 from the tiktoken ranks: each rank's bytes in the byte-level
    alphabet, and each merge as the pair of pieces whose BPE gives that token."""
    enc, alphabet = gpt2_tokenizer(), _bytes_to_unicode()
    to_piece = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT_ID)}
    vocab = {to_piece(b): i for b, i in ranks.items()} | {EOT: EOT_ID}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe_split(token, ranks, rank)
        merges.append(f"{to_piece(parts[0])} {to_piece(parts[1])}")
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return [out_dir / "vocab.json", out_dir / "merges.txt"]


def _bpe_split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> tuple[bytes, bytes]:
    """The two pieces BPE merges last into `token`: run BPE on its bytes with ranks below its own."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], max_rank + 1))
        if ranks.get(parts[best] + parts[best + 1], max_rank + 1) >= max_rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]
