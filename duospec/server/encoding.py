"""The server's prompt encoding: user text stays text, long prompts tokenize beside short ones, and a
prompt too long to fit is refused from its byte length alone.

- User text cannot inject control tokens: a plain prompt is tokenized with `split_special_tokens`,
  and a chat's template is rendered around placeholders, so the template's own markers stay control
  tokens while `<|im_end|>` typed into a message's content is plain text. Content without such text
  gets exactly the ids `duospec.api.encode_prompt` gives (the same call on the same rendered text).
  `--allow-special-tokens` restores the old parsing (encode_prompt itself).
- Two lanes, each one thread with a tokenizer copy of its own (a transformers tokenizer is not safe to
  share between threads: a call sets flags on it): prompts over LONG_PROMPT_BYTES take the long
  lane, so a 4-token request never waits behind megabytes being tokenized.
- `text_bytes_per_token`: the most bytes of text one token can stand for, read off the tokenizer's
  vocabulary and normalizer; a prompt with more bytes than that times the token limit cannot fit.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

from duospec.api import encode_prompt
from duospec.config import DuospecError

LONG_PROMPT_BYTES = 64 * 1024  # about 0.1 s of tokenizing on one core: longer prompts take the long lane
# How many bytes of raw text a Unicode normalizer can fold into one byte of the text it tokenizes:
# NFC composes three 3-byte Hangul jamo into one 3-byte syllable; NFKC maps the 4-byte U+1D400 to "A";
# lowercasing maps the 3-byte Kelvin sign to "k". Normalizers not listed may delete text: no bound.
_NORMALIZER_FOLD = {"NFC": 3, "NFD": 1, "NFKC": 4, "NFKD": 4, "Lowercase": 3, "Prepend": 1}
_TEXT_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


class PromptEncoder:
    """Token ids of the server's prompts, off the event loop, in two lanes (short and long prompts)."""

    def __init__(self, tokenizer, vocab_size: int, *, allow_special_tokens: bool = False) -> None:
        self.vocab_size = vocab_size
        self.allow_special_tokens = allow_special_tokens
        self.bytes_per_token = text_bytes_per_token(tokenizer)  # None: this tokenizer gives no bound
        # One thread and one tokenizer copy per lane: each copy is only ever used by its lane's thread.
        self._lanes = [(ThreadPoolExecutor(1, thread_name_prefix=f"duospec-encode-{name}"), copy.deepcopy(tokenizer)) for name in ("short", "long")]

    def max_prompt_bytes(self, max_tokens: int) -> int | None:
        """The most bytes of text a prompt of `max_tokens` tokens can hold (None: no bound known)."""
        return None if self.bytes_per_token is None else max_tokens * self.bytes_per_token

    async def encode(self, prompt: str | list[int] | list[dict], chat: bool) -> list[int]:
        executor, tokenizer = self._lanes[1 if prompt_bytes(prompt) > LONG_PROMPT_BYTES else 0]
        return await asyncio.get_running_loop().run_in_executor(executor, self.encode_with, tokenizer, prompt, chat)

    def encode_with(self, tokenizer, prompt: str | list[int] | list[dict], chat: bool) -> list[int]:
        """The ids of `prompt` (runs on a lane's thread with that lane's tokenizer)."""
        if self.allow_special_tokens:
            return encode_prompt(tokenizer, self.vocab_size, prompt, chat)
        if isinstance(prompt, str) and chat:
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, str):
            if not prompt.strip():
                return encode_prompt(tokenizer, self.vocab_size, prompt, chat)  # its usual error
            return tokenizer(prompt, split_special_tokens=True)["input_ids"]
        messages = isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)
        if not messages or not getattr(tokenizer, "chat_template", None) or not all(isinstance(m.get("content"), str) and m.get("role") for m in prompt):
            return encode_prompt(tokenizer, self.vocab_size, prompt, chat)  # token ids, or the usual error
        return encode_chat(tokenizer, prompt)

    def close(self) -> None:
        for executor, _ in self._lanes:
            executor.shutdown(wait=False, cancel_futures=True)


def prompt_bytes(prompt: str | list[int] | list[dict]) -> int:
    """The UTF-8 length of a prompt's text (a chat's: its messages' contents; token ids: 4 a token)."""
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8", "surrogatepass"))
    if all(isinstance(m, dict) for m in prompt):
        return sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in prompt if isinstance(m.get("content"), str))
    return 4 * len(prompt)


# -- chats: the template's markers are control tokens, the messages' text is text ---------------------
def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """encode_prompt's ids for `messages`, except that control-token text inside a message's content
    is tokenized as plain text (split_special_tokens) instead of becoming a control token."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    spans = content_spans(tokenizer, messages, text)
    if spans is None:  # the template changes the messages' text: where it went is unknown
        _refuse_control_text(tokenizer, messages)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a tokenizer without offsets: always the careful way
        return _encode_pieces(tokenizer, text, spans)
    control = _control_ids(tokenizer)
    spans_sorted = sorted(spans)
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if token in control and any(start < span_end and end > span_start for span_start, span_end in spans_sorted):
            return _encode_pieces(tokenizer, text, spans)  # a message's text held a control token
    return encoded["input_ids"]  # the very ids of encode_prompt: same call, same text


def content_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]] | None:
    """Where each message's content lies in the rendered `text`, found by rendering the template with
    a random placeholder in place of each content; None if the template does not copy contents as
    they are (or with surrounding whitespace trimmed)."""
    nonce = secrets.token_hex(8)
    marked = [{**message, "content": f"\ue000{nonce}:{index}\ue001"} for index, message in enumerate(messages)]
    try:
        rendered = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that inspects the content (and refuses a placeholder)
        return None
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", rendered)  # [template, index, template, index, ..., template]
    if sorted(int(index) for index in pieces[1::2]) != list(range(len(messages))):
        return None  # some content dropped or repeated
    for fit in (lambda content: content, str.strip):
        spans, parts, position = [], [], 0
        for number, piece in enumerate(pieces):
            if number % 2:
                piece = fit(messages[int(piece)]["content"])
                spans.append((position, position + len(piece)))
            parts.append(piece)
            position += len(piece)
        if "".join(parts) == text:
            return spans
    return None


def _control_ids(tokenizer) -> set[int]:
    """The ids that split_special_tokens keeps out of text: the special added tokens."""
    return {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}


def _encode_pieces(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[int]:
    """The rendered chat piece by piece: the template's text as usual, the contents as plain text."""
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids, position = [], 0
    for start, end in sorted(spans):
        ids += _encode_piece(tokenizer, text[position:start], False, newline, first=position == 0)
        content = _encode_piece(tokenizer, text[start:end], True, newline, first=start == 0)
        if _control_ids(tokenizer) & set(content):
            raise DuospecError("a message's content encodes to a control token even as plain text; remove the special-token text from it")
        ids += content
        position = end
    return ids + _encode_piece(tokenizer, text[position:], False, newline, first=position == 0)


def _encode_piece(tokenizer, piece: str, as_text: bool, newline: list[int], first: bool) -> list[int]:
    """One piece from the middle of a chat; behind a newline that is then removed, so that a
    SentencePiece tokenizer does not add the space it adds at the start of a string."""
    if not piece:
        return []
    if first:
        return tokenizer(piece, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
    ids = tokenizer("\n" + piece, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
    if ids[: len(newline)] == newline:
        return ids[len(newline):]
    return tokenizer(piece, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]


def _refuse_control_text(tokenizer, messages: list[dict]) -> None:
    """Where the contents cannot be located, content holding control-token text is refused."""
    control = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    for index, message in enumerate(messages):
        found = next((token for token in control if token in message["content"]), None)
        if found is not None:
            raise DuospecError(
                f"messages.{index}.content holds the control-token text {found!r}, and this model's chat template rewrites message text, "
                "so duospec cannot keep it as plain text; remove it (or start the server with --allow-special-tokens)"
            )


# -- the byte bound -----------------------------------------------------------------------------------
def text_bytes_per_token(tokenizer) -> int | None:
    """The most bytes of a prompt's text that one token can stand for, or None where the tokenizer may
    drop text (then no bound holds). Byte-level BPE (GPT-2, Qwen, Llama 3) and byte-fallback BPE
    (Llama 2, Mistral) qualify: every byte has a token, so text never vanishes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        config = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - no tokenizers backend (or one that cannot say): no bound
        return None
    fold = _normalizer_fold(config.get("normalizer"))
    model = config.get("model") or {}
    pre_tokenizer = config.get("pre_tokenizer")
    if fold is None or not _keeps_text(pre_tokenizer) or model.get("type") != "BPE":
        return None
    vocab = model.get("vocab") or {}
    if _uses(pre_tokenizer, "ByteLevel"):
        from tokenizers.pre_tokenizers import ByteLevel

        if not set(ByteLevel.alphabet()) <= vocab.keys():
            return None  # a byte without a token would vanish
        longest = max(map(len, vocab))  # one character per byte
    elif model.get("byte_fallback") and all(f"<0x{byte:02X}>" in vocab for byte in range(256)):
        longest = max(len(token.replace("\u2581", " ").encode()) for token in vocab)
    else:
        return None
    added = [len(token["content"].encode()) for token in config.get("added_tokens") or []]
    return fold * max([longest, *added])


def _normalizer_fold(normalizer: dict | None) -> int | None:
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        folds = [_normalizer_fold(part) for part in normalizer.get("normalizers", [])]
        return None if None in folds else math.prod(folds)
    if kind == "Replace":
        pattern, content = (normalizer.get("pattern") or {}).get("String"), normalizer.get("content") or ""
        if pattern is None or not content:
            return None  # a regular expression, or a deletion
        return max(1, math.ceil(len(pattern.encode()) / len(content.encode())))
    return _NORMALIZER_FOLD.get(kind)


def _keeps_text(pre_tokenizer: dict | None) -> bool:
    """Whether a pre-tokenizer passes all of its text on (Whitespace and friends drop the spaces)."""
    if pre_tokenizer is None:
        return True
    if pre_tokenizer.get("type") == "Sequence":
        return all(_keeps_text(part) for part in pre_tokenizer.get("pretokenizers", []))
    return pre_tokenizer.get("type") in _TEXT_KEEPING_PRE_TOKENIZERS and pre_tokenizer.get("behavior") != "Removed"


def _uses(pre_tokenizer: dict | None, kind: str) -> bool:
    if pre_tokenizer is None:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_uses(part, kind) for part in pre_tokenizer.get("pretokenizers", []))
    return pre_tokenizer.get("type") == kind
