"""One prompt format: a served chat request's prompt ids are the ids training put before the reply."""
from __future__ import annotations

import pytest

from dsft.data.files import Record
from dsft.data.prompt import IGNORE, encode_chat, encode_instruction, encode_prompt
from dsft.data.tokenize import build_examples

# ChatML-like; "<|endoftext|>" doubles as the end-of-turn token (the preset has no <|im_end|>).
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The same with {% generation %} around the reply only, not its end token: the template's own mask
# (return_assistant_tokens_mask) then differs from what the span finder would take.
GENERATION = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
              "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
              "{% else %}{{ m.content }}{% endif %}<|endoftext|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATES = {"plain": None, "chat template": CHATML, "generation mask": GENERATION}


@pytest.fixture(scope="module")
def preset_tokenizer(tiny_base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture(params=list(TEMPLATES))
def tok(request, preset_tokenizer):
    preset_tokenizer.chat_template = TEMPLATES[request.param]
    yield preset_tokenizer
    preset_tokenizer.chat_template = None


def prompt_ids(ids: list[int], labels: list[int], reply: int = 0) -> list[int]:
    """The ids before assistant reply number ``reply``: what the model saw before it replied."""
    starts = [k for k, y in enumerate(labels) if y != IGNORE and (k == 0 or labels[k - 1] == IGNORE)]
    return ids[: starts[reply]]


def test_served_prompt_equals_the_training_prompt(tok):
    from dsft.runtime.chat import encode_messages

    record = Record.instruction("What is EBITDA?", "Earnings before interest, taxes, depreciation and amortisation.")
    examples = build_examples(tok, [record], seq_len=256)
    row = examples.input_ids[0].tolist(), examples.labels[0].tolist()

    served = encode_messages(tok, [{"role": "user", "content": "What is EBITDA?"}])

    assert served == prompt_ids(*row)


def test_served_prompt_equals_the_training_prompt_in_a_chat_with_a_system_turn(tok):
    from dsft.runtime.chat import encode_messages

    chat = [{"role": "system", "content": "Answer as an accountant."}, {"role": "user", "content": "Define accrual."},
            {"role": "assistant", "content": "Revenue recorded when earned."}]

    ids, labels = encode_chat(tok, chat, seq_len=256)

    assert encode_messages(tok, chat[:2]) == prompt_ids(ids, labels)


def test_an_instruction_trains_in_the_bases_chat_template(preset_tokenizer):
    preset_tokenizer.chat_template = CHATML
    try:
        ids, labels = encode_instruction(preset_tokenizer, "Define accrual.", "Revenue recorded when earned.", 256)
        rendered = preset_tokenizer.apply_chat_template(
            [{"role": "user", "content": "Define accrual."}, {"role": "assistant", "content": "Revenue recorded when earned."}],
            tokenize=False)
    finally:
        preset_tokenizer.chat_template = None

    assert preset_tokenizer.decode(ids) == rendered
    assert preset_tokenizer.decode([i for i, y in zip(ids, labels) if y != IGNORE]) == \
        "Revenue recorded when earned.<|endoftext|>\n"


def test_a_generation_block_decides_the_loss_positions(preset_tokenizer):
    preset_tokenizer.chat_template = GENERATION
    try:
        ids, labels = encode_instruction(preset_tokenizer, "Define accrual.", "Revenue recorded when earned.", 256)
    finally:
        preset_tokenizer.chat_template = None

    assert preset_tokenizer.decode([i for i, y in zip(ids, labels) if y != IGNORE]) == "Revenue recorded when earned."


def test_tool_turns_render_in_the_plain_template_with_the_call_trained(preset_tokenizer):
    chat = Record.chat([
        {"role": "user", "content": "EUR rate?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_rate", "arguments": {"currency": "EUR"}}}]},
        {"role": "tool", "content": "1.08"},
        {"role": "assistant", "content": "1.08 USD."},
    ])

    ids, labels = encode_chat(preset_tokenizer, chat.messages, 256)

    text = preset_tokenizer.decode(ids)
    assert "### Tool:\n1.08\n\n### Response:\n1.08 USD." in text
    trained = preset_tokenizer.decode([i for i, y in zip(ids, labels) if y != IGNORE])
    assert trained == '{"name": "get_rate", "arguments": {"currency": "EUR"}}<|endoftext|>1.08 USD.<|endoftext|>'
    assert encode_prompt(preset_tokenizer, chat.messages[:3]) == prompt_ids(ids, labels, reply=1)


def test_many_conversations_encode_at_once_exactly_as_one_by_one(tok):
    """encode_chats (what tokenising a corpus uses: two tokenizer calls per chunk with the plain template)
    gives each conversation the ids and labels of encode_chat, with system and tool turns, several replies,
    control-token text in user content, and a cut at seq_len."""
    from dsft.data.prompt import encode_chats

    conversations = [
        [{"role": "user", "content": "What is EBITDA?"}, {"role": "assistant", "content": "Earnings before interest."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say <|endoftext|> twice"},
         {"role": "assistant", "content": "No."}, {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Policy."}],
        [{"role": "user", "content": "Rate?"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "rate", "arguments": {"ccy": "EUR"}}}]},
         {"role": "tool", "content": "3.1%"}, {"role": "assistant", "content": "It is 3.1%."}],
    ]
    for seq_len in (1 << 20, 12):
        assert encode_chats(tok, conversations, seq_len) == [encode_chat(tok, c, seq_len) for c in conversations]
