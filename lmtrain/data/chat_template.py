"""Chat template: conversation → token ids plus a loss mask that is exact by construction.

Turns are encoded one piece at a time (marker, separator, content, end marker), so the template
knows which ids are assistant content instead of guessing from decoded text. Role markers are
inserted as special-token ids (``tokenizer.token_id``), never encoded from their text.

Default layout (``ChatTemplate()``), one string per turn joined by ``turn_sep``::

    <|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|></s>

The loss mask is 1 on assistant content, its ``<|end|>`` and the final EOS (so the model learns to
stop) and 0 on everything else: system/user turns, markers, separators, BOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from lmtrain.data.formats import ConversationLike, as_conversation
from lmtrain.data.tokenizer import Tokenizer
from lmtrain.errors import DataError


class EncodedChat(NamedTuple):
    ids: list[int]
    loss_mask: list[int]  # aligned to ids: 1 where ids[i] is a token the model should learn
    response_start: int  # index of the last assistant turn's header; len(ids) if none


@dataclass(frozen=True)
class ChatTemplate:
    """Role markers and separators; frozen and picklable so it can ride in Grain transforms.

    ``markers_are_special=False`` encodes markers as plain text instead (for tokenizers without
    chat specials); the mask stays exact because it is still built piece by piece.
    ``add_bos`` defaults to False because lmtrain's pretraining stream separates documents with
    EOS only; set it for models pretrained with BOS (Llama-style SentencePiece models).
    """

    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"
    header_sep: str = "\n"  # between a role marker and the content
    turn_sep: str = "\n"  # between one turn's end marker and the next role marker
    markers_are_special: bool = True
    add_bos: bool = False
    add_eos: bool = True
    train_on_all_assistant_turns: bool = True

    def marker(self, role: str) -> str:
        return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]

    def render(self, conv: ConversationLike, *, generation_prompt: bool = False) -> str:
        """Human-readable text of what ``encode`` produces (BOS/EOS omitted); for logs and docs."""
        parts = [
            f"{self.marker(role)}{self.header_sep}{content}{self.end}"
            for role, content in as_conversation(conv)
        ]
        if generation_prompt:
            parts.append(f"{self.assistant}{self.header_sep}")
        return self.turn_sep.join(parts)

    def encode(self, conv: ConversationLike, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
        """``(ids, loss_mask)`` for training; see the module docstring for what is masked."""
        ids, mask, _ = self.encode_chat(conv, tokenizer)
        return ids, mask

    def encode_generation_prompt(self, conv: ConversationLike, tokenizer: Tokenizer) -> list[int]:
        """Ids of the conversation so far followed by an open assistant header, no EOS."""
        return self.encode_chat(conv, tokenizer, generation_prompt=True).ids

    def encode_chat(
        self, conv: ConversationLike, tokenizer: Tokenizer, *, generation_prompt: bool = False
    ) -> EncodedChat:
        """Like ``encode`` but also returns where the last assistant turn starts (for truncation)."""
        turns = as_conversation(conv).turns
        pieces = _Pieces(self, tokenizer)
        assistant_at = [i for i, t in enumerate(turns) if t.role == "assistant"]
        last = assistant_at[-1] if assistant_at else -1
        ids: list[int] = [tokenizer.bos_id] if self.add_bos else []
        mask: list[int] = [0] * len(ids)
        response_start = -1

        def emit(new: list[int], m: int) -> None:
            ids.extend(new)
            mask.extend([m] * len(new))

        for i, (role, content) in enumerate(turns):
            if i:
                emit(pieces.turn_sep, 0)
            if i == last:
                response_start = len(ids)
            emit(pieces.marker(role) + pieces.header_sep, 0)
            trained = role == "assistant" and (self.train_on_all_assistant_turns or i == last)
            emit(tokenizer.encode(content) if content else [], int(trained))
            emit(pieces.end, int(trained))
        if generation_prompt:
            if turns:
                emit(pieces.turn_sep, 0)
            emit(pieces.marker("assistant") + pieces.header_sep, 0)
        elif self.add_eos:
            # EOS is learned only when it ends a trained assistant turn: the model's own stop.
            emit([tokenizer.eos_id], int(bool(turns) and turns[-1].role == "assistant"))
        return EncodedChat(ids, mask, len(ids) if response_start < 0 else response_start)


class _Pieces:
    """Template pieces as ids for one tokenizer, with a clear error for what it lacks."""

    def __init__(self, template: ChatTemplate, tokenizer: Tokenizer):
        self.template, self.tokenizer = template, tokenizer
        self.header_sep = self._text(template.header_sep)
        self.turn_sep = self._text(template.turn_sep)
        self.end = self._marker(template.end)

    def marker(self, role: str) -> list[int]:
        return self._marker(self.template.marker(role))

    def _marker(self, piece: str) -> list[int]:
        if not self.template.markers_are_special:
            return self._text(piece)
        try:
            return [self.tokenizer.token_id(piece)]
        except DataError as e:
            raise DataError(
                f"chat template marker {piece!r} is not a special token of this tokenizer ({e}); "
                "train the tokenizer with CHAT_SPECIALS, or use ChatTemplate(markers_are_special="
                "False) to encode markers as text"
            ) from None

    def _text(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text) if text else []
        if self.tokenizer.unk_id in ids:
            raise DataError(f"chat template text {text!r} encodes to <unk> with this tokenizer")
        return ids
