"""Tokenising records: packing raw text, masking prompts, chats with and without a template."""
from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from dsft.data.files import Record
from dsft.data.tokenize import (
    IGNORE,
    Examples,
    build_examples,
    collate,
    count_tokens,
    encode_chat,
    encode_instruction,
    pack_texts,
)
from dsft.errors import DataError, UsageError

CORPUS = [
    "The balance sheet lists assets, liabilities and equity.",
    "### Instruction:\nExplain the term.\n\n### Response:\nA short answer.",
    "Interest accrues daily and is paid monthly.",
    "user assistant system hello world",
]

# A ChatML-like template; "<|endoftext|>" doubles as the end-of-turn token.
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained in milliseconds; no downloads."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_text(tok, ids, labels) -> str:
    return tok.decode([i for i, y in zip(ids, labels) if y != IGNORE])


# --- packing ---------------------------------------------------------------------------------


def test_pack_texts_cuts_the_eos_separated_stream_into_full_blocks(tok):
    docs = CORPUS[:3]
    stream = [t for d in docs for t in ids_of(tok, d) + [tok.eos_token_id]]
    seq_len = 16

    blocks = pack_texts(tok, docs, seq_len)

    assert blocks.shape == (len(stream) // seq_len, seq_len)  # the tail remainder is dropped
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert (blocks == tok.eos_token_id).sum() == sum(1 for t in stream[: blocks.numel()] if t == tok.eos_token_id)


def test_pack_texts_shorter_than_a_block_gives_one_padded_block(tok):
    short = ids_of(tok, "hello world")

    blocks = pack_texts(tok, ["hello world"], 32)

    assert blocks.shape == (1, 32)
    assert blocks[0, : len(short) + 1].tolist() == short + [tok.eos_token_id]
    assert (blocks[0, len(short) + 1 :] == tok.pad_token_id).all()
    assert pack_texts(tok, [], 32).shape == (0, 32)


def test_raw_records_are_packed_and_labelled_as_themselves(tok):
    ex = build_examples(tok, [Record.raw(t) for t in CORPUS * 4], seq_len=16)

    # the training loop shifts; the first token has no context and never takes loss
    assert torch.equal(ex.labels[:, 1:], ex.input_ids[:, 1:]) and (ex.labels[:, 0] == IGNORE).all()
    assert ex.attention_mask.all()
    assert torch.equal(ex.position_ids, torch.arange(16).expand(len(ex), 16))  # documents attend across EOS


def test_a_short_raw_block_masks_its_padding(tok):
    ex = build_examples(tok, [Record.raw("hello world")], seq_len=32)

    n = len(ids_of(tok, "hello world")) + 1
    assert ex.attention_mask[0].tolist() == [1] * n + [0] * (32 - n)
    assert (ex.labels[0, n:] == IGNORE).all() and (ex.labels[0, 1:n] == ex.input_ids[0, 1:n]).all()


def test_special_token_text_inside_data_is_not_a_control_token(tok):
    blocks = pack_texts(tok, ["a <|endoftext|> b"], 64)

    assert (blocks == tok.eos_token_id).sum() == 1  # only the separator we add


# --- instructions ------------------------------------------------------------------------------


def test_instruction_loss_is_on_the_response_and_eos_only(tok):
    prompt, response = "Explain the term.", "A short answer."
    head = ids_of(tok, f"### Instruction:\n{prompt}\n\n### Response:\n")

    ids, labels = encode_instruction(tok, prompt, response, seq_len=128)

    assert ids == head + ids_of(tok, response) + [tok.eos_token_id]
    assert labels[: len(head)] == [IGNORE] * len(head)
    assert labels[len(head):] == ids[len(head):]
    assert trained_text(tok, ids, labels) == response + "<|endoftext|>"


def test_instruction_is_truncated_keeping_the_start(tok):
    full, _ = encode_instruction(tok, "Explain the term.", "A short answer.", seq_len=128)

    ids, labels = encode_instruction(tok, "Explain the term.", "A short answer.", seq_len=10)

    assert ids == full[:10] and len(labels) == 10


# --- chats -------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"}, {"role": "user", "content": "again"},
        {"role": "assistant", "content": "hello again"}]


def test_chat_without_template_uses_the_plain_one(tok):
    one_turn = [{"role": "user", "content": "Explain the term."}, {"role": "assistant", "content": "A short answer."}]
    assert encode_chat(tok, one_turn, 128) == encode_instruction(tok, "Explain the term.", "A short answer.", 128)

    ids, labels = encode_chat(tok, CHAT, 128)

    assert tok.decode(ids) == ("### System:\nBe brief.\n\n### Instruction:\nhello\n\n### Response:\nworld<|endoftext|>"
                               "### Instruction:\nagain\n\n### Response:\nhello again<|endoftext|>")
    assert trained_text(tok, ids, labels) == "world<|endoftext|>hello again<|endoftext|>"


def test_chat_with_a_template_trains_assistant_turns_and_their_end_token():
    tok = make_tokenizer(CHATML)

    ids, labels = encode_chat(tok, CHAT, 256)

    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert trained_text(tok, ids, labels) == "world<|endoftext|>\nhello again<|endoftext|>\n"


def test_chat_template_that_renders_the_last_turn_differently_falls_back_to_the_content():
    # Like Qwen3's: only the final assistant turn gets an (empty) think block.
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                "{% if loop.last and m.role == 'assistant' %}<think></think>{% endif %}"
                "{{ m.content }}<|endoftext|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = make_tokenizer(template)

    ids, labels = encode_chat(tok, CHAT, 256)

    assert trained_text(tok, ids, labels) == "world<|endoftext|><think></think>hello again<|endoftext|>\n"


# --- records -> examples ---------------------------------------------------------------------


def test_build_examples_packs_raw_text_then_packs_instructions_and_chats_into_shared_rows(tok):
    records = [Record.raw(t) for t in CORPUS * 2] + [Record.instruction("Explain the term.", "A short answer."),
                                                      Record.chat(CHAT)]
    seq_len = 96
    packed = pack_texts(tok, CORPUS * 2, seq_len)
    ids, labels = encode_instruction(tok, "Explain the term.", "A short answer.", seq_len)
    chat_ids, chat_labels = encode_chat(tok, CHAT, seq_len)
    assert len(ids) + len(chat_ids) <= seq_len  # so both fit one row

    ex = build_examples(tok, records, seq_len)

    assert len(ex) == len(packed) + 1 and ex.input_ids.shape[1] == seq_len
    assert torch.equal(ex.input_ids[: len(packed)], packed)
    row, n = len(packed), len(ids) + len(chat_ids)
    longer, shorter = sorted([(ids, labels), (chat_ids, chat_labels)], key=lambda p: -len(p[0]))  # best-fit decreasing
    assert ex.input_ids[row, :n].tolist() == longer[0] + shorter[0]
    assert (ex.input_ids[row, n:] == tok.pad_token_id).all() and (ex.labels[row, n:] == IGNORE).all()
    assert ex.labels[row, :n].tolist() == [IGNORE] + longer[1][1:] + [IGNORE] + shorter[1][1:]
    assert ex.position_ids[row].tolist() == [*range(len(longer[0])), *range(len(shorter[0])), *range(seq_len - n)]
    assert ex.attention_mask[row].sum() == n
    assert count_tokens(ex) == int((ex.labels[:, 1:] != IGNORE).sum())


def test_build_examples_drops_prompts_that_fill_seq_len(tok, caplog):
    long = Record.instruction("word " * 50, "answer", source="qa.jsonl:2")
    ok = Record.instruction("q", "answer")

    with caplog.at_level(logging.WARNING, logger="dsft.data"):
        ex = build_examples(tok, [long, ok], seq_len=12)

    assert len(ex) == 1 and ex.attention_mask.sum() == len(encode_instruction(tok, "q", "answer", 12)[0])
    assert "qa.jsonl:2" in caplog.text
    with pytest.raises(DataError, match=r"qa\.jsonl:2: no record has a response token within seq_len=12"):
        build_examples(tok, [long], seq_len=12)


def test_a_failing_chat_template_names_the_record():
    tok = make_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=r"chat\.jsonl:4: the tokenizer's chat template fails .*roles must alternate"):
        build_examples(tok, [Record.chat(CHAT, source="chat.jsonl:4")], seq_len=64)


def test_seq_len_must_leave_room_for_the_shift(tok):
    with pytest.raises(UsageError, match="seq_len must be >= 2"):
        build_examples(tok, [Record.raw("x")], seq_len=1)


def test_examples_feed_a_dataloader_through_collate(tok):
    ex = build_examples(tok, [Record.instruction("q", f"answer {i}") for i in range(10)], seq_len=40)
    assert len(ex) == 5  # two examples per row

    batches = list(DataLoader(ex, batch_size=2, collate_fn=collate))

    assert [b["input_ids"].shape for b in batches] == [(2, 40), (2, 40), (1, 40)]
    assert torch.equal(torch.cat([b["position_ids"] for b in batches]), ex.position_ids)
    assert torch.equal(torch.cat([b["labels"] for b in batches]), ex.labels)
    assert Examples.from_dict(ex.to_dict()).input_ids.equal(ex.input_ids)
