"""Loaders: every schema, every bad-row kind (error names file, row and field; skip counts), tokenisation."""

import json

import pytest

from afd_ray.data.readers import load_demonstrations, load_preferences
from afd_ray.data.schema import DataError, parse_hh_text
from afd_ray.data.tokenize import (
    TruncationRules,
    collate,
    encode_demonstration,
    encode_demonstrations,
    left_pad,
)

GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]}


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n")
    return path


# ---- schemas -------------------------------------------------------------------------------------------------

def test_each_demonstration_schema(tmp_path):
    rows = [
        GOOD,
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]},
        {"prompt": "Summarise: x", "response": "x."},
        {"prompt": [{"role": "user", "content": "p"}], "response": "q"},
        {"text": "\n\nHuman: hey\n\nAssistant: yo\n\nHuman: more?\n\nAssistant: sure"},
    ]
    demos = load_demonstrations(write_jsonl(tmp_path / "d.jsonl", rows)).items
    assert [d.response for d in demos] == ["Hello!", "d", "r", "x.", "q", "sure"]
    assert demos[1].prompt[0] == {"role": "system", "content": "Be brief."} and demos[1].prompt[-1]["content"] == "c"
    assert demos[2].prompt == [{"role": "user", "content": "q"}]
    assert demos[3].prompt == [{"role": "user", "content": "Summarise: x"}]
    assert [m["role"] for m in demos[5].prompt] == ["user", "assistant", "user"]
    assert demos[0].row == 1 and demos[5].row == 6  # jsonl rows are line numbers


def test_json_and_parquet_files(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([GOOD, {"prompt": "a", "response": "b"}]))
    assert [d.response for d in load_demonstrations(tmp_path / "d.json").items] == ["Hello!", "b"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]),
                   tmp_path / "d.parquet")
    assert [d.response for d in load_demonstrations(tmp_path / "d.parquet").items] == ["b", "d"]


def test_preference_schemas(tmp_path):
    rows = [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q2", "chosen": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "g"}],
         "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "b"}]},
        {"chosen": "\n\nHuman: How?\n\nAssistant: Carefully.", "rejected": "\n\nHuman: How?\n\nAssistant: No."},
    ]
    prefs = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows)).items
    assert [(p.chosen, p.rejected) for p in prefs] == [("good", "bad"), ("g", "b"), ("Carefully.", "No.")]
    assert prefs[2].prompt == [{"role": "user", "content": "How?"}]
    bad = write_jsonl(tmp_path / "q.jsonl", [{"chosen": "\n\nHuman: A\n\nAssistant: x",
                                              "rejected": "\n\nHuman: B\n\nAssistant: y"}])
    with pytest.raises(DataError, match="different conversations"):
        load_preferences(bad)


def test_hh_text_parser():
    assert parse_hh_text("\n\nHuman: a b\n\nAssistant: c") == [
        {"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(ValueError, match="HH-RLHF"):
        parse_hh_text("plain text")


# ---- bad rows: error names file, row and field; skip counts -----------------------------------------------

BAD_ROWS = {
    "missing_field": ({"prompt": "only a prompt"}, "field 'response'"),
    "wrong_type": ({"prompt": "p", "response": 42}, "expected str, got int"),
    "empty_response": ({"prompt": "p", "response": "   "}, "empty response"),
    "unknown_role": ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     "unknown role 'wizard'"),
    "broken_json": (b'{"prompt": "p", "response": \n', "broken JSON"),
    "not_utf8": (b'{"prompt": "caf\xe9", "response": "x"}\n', "not valid UTF-8 (byte 0xe9"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_error_names_file_row_field(tmp_path, kind):
    row, needle = BAD_ROWS[kind]
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError) as err:
        load_demonstrations(path)
    msg = str(err.value)
    assert str(path) in msg and "row 3" in msg and needle in msg, msg
    assert err.value.kind == kind and err.value.row == 3


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_skip_is_counted(tmp_path, kind):
    row, _ = BAD_ROWS[kind]
    loaded = load_demonstrations(write_jsonl(tmp_path / "bad.jsonl", [GOOD, row, GOOD]), on_bad_row="skip")
    assert len(loaded.items) == 2 and loaded.skipped == {kind: 1} and "row 2" in loaded.examples[0]


def test_non_utf8_json_file_and_bad_policy(tmp_path):
    (tmp_path / "d.json").write_bytes(b'[{"prompt": "\xff", "response": "x"}]')
    with pytest.raises(DataError, match=r"d.json: not valid UTF-8 \(byte 0xff on line 1\)"):
        load_demonstrations(tmp_path / "d.json")
    with pytest.raises(ValueError, match="on_bad_row"):
        load_demonstrations(tmp_path / "d.json", on_bad_row="ignore")
    (tmp_path / "d.csv").write_text("prompt,response\n")
    with pytest.raises(ValueError, match="unsupported extension '.csv'"):
        load_demonstrations(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_demonstrations(tmp_path / "missing.jsonl")


def test_all_rows_bad_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable demonstration rows"):
        load_demonstrations(write_jsonl(tmp_path / "d.jsonl", [{"x": 1}]), on_bad_row="skip")


def test_hub_name_without_network_says_what_to_do():
    with pytest.raises(RuntimeError, match="offline:chatterbot"):
        load_demonstrations("HuggingFaceH4/ultrachat_200k")


# ---- offline set -------------------------------------------------------------------------------------------

def test_offline_sets_load():
    bot = load_demonstrations("offline:chatterbot", on_bad_row="skip")
    assert len(bot.items) > 2000 and bot.num_skipped == 16  # the corpus's own empty turns, counted
    assert bot.items[0].prompt == [{"role": "user", "content": "What is AI?"}]
    chat = load_demonstrations("offline:chitchat", on_bad_row="skip", limit=500)
    assert len(chat.items) == 500 and all(d.prompt[0]["role"] == "user" for d in chat.items)
    assert all(len(d.prompt) <= 3 for d in chat.items)
    with pytest.raises(ValueError, match="offline:chatterbot"):
        load_demonstrations("offline:nope")


# ---- tokenisation ------------------------------------------------------------------------------------------

def demo(prompt, response, row=1):
    from afd_ray.data.schema import Demonstration

    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return Demonstration(msgs, response, "t.jsonl", row)


def test_encode_masks_and_end_of_turn(tokenizer):
    enc = encode_demonstration(tokenizer, demo("What is 2+2?", "Four."), TruncationRules())
    assert tokenizer.decode(enc.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(enc.response_ids) == "Four.<|im_end|>"
    assert enc.response_ids[-1] == tokenizer.eos_token_id and not enc.truncated  # no trailing "\n"
    batch = collate([enc.prompt_ids], [enc.response_ids], tokenizer.pad_token_id)
    picked = batch.input_ids[0][batch.response_mask[0].bool()].tolist()
    assert picked == enc.response_ids


def test_prompt_too_long_rules(tokenizer):
    long = demo("word " * 300, "ok", row=7)
    with pytest.raises(DataError) as err:
        encode_demonstration(tokenizer, long, TruncationRules(max_prompt_tokens=64))
    assert "t.jsonl, row 7, field 'prompt'" in str(err.value) and "max_prompt_tokens=64" in str(err.value)
    enc, skipped = encode_demonstrations(tokenizer, [long, demo("hi", "ok")],
                                         TruncationRules(max_prompt_tokens=64, prompt_overflow="skip"))
    assert len(enc) == 1 and skipped == {"prompt_too_long": 1}


def test_drop_turns_keeps_system_and_last_user(tokenizer):
    msgs = [{"role": "system", "content": "S"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} " * 8}, {"role": "assistant", "content": "answer " * 8}]
    msgs.append({"role": "user", "content": "final question"})
    rules = TruncationRules(max_prompt_tokens=80, prompt_overflow="drop_turns")
    enc = encode_demonstration(tokenizer, demo(msgs, "fine"), rules)
    text = tokenizer.decode(enc.prompt_ids)
    assert len(enc.prompt_ids) <= 80 and "<|im_start|>system\nS" in text and "final question" in text
    assert "question 0" not in text
    hopeless = demo([{"role": "user", "content": "x " * 200}], "y")
    _, skipped = encode_demonstrations(tokenizer, [hopeless, demo("a", "b")],
                                       TruncationRules(max_prompt_tokens=40, prompt_overflow="drop_turns",
                                                       on_bad_row="skip"))
    assert skipped == {"prompt_too_long": 1}


def test_response_truncation(tokenizer):
    long = demo("hi", "very " * 100)
    enc = encode_demonstration(tokenizer, long, TruncationRules(max_response_tokens=10))
    assert len(enc.response_ids) == 10 and enc.truncated and tokenizer.eos_token_id not in enc.response_ids
    with pytest.raises(DataError, match="max_response_tokens=10"):
        encode_demonstration(tokenizer, long, TruncationRules(max_response_tokens=10, response_overflow="error"))


def test_left_pad_and_collate():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    b = collate([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 4, 0], [3, 5, 6, 7]]
    assert b.response_mask.tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]
    assert b.shifted_mask.tolist() == [[0, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        collate([[1], [2]], [[3]], 0)


def test_encode_preferences_share_the_prompt_and_follow_the_rules(tokenizer):
    from afd_ray.data.schema import Preference
    from afd_ray.data.tokenize import encode_preferences

    msgs = [{"role": "user", "content": "Is the sky blue?"}]
    prefs = [Preference(msgs, "Yes.", "No.", "p.jsonl", 1), Preference(msgs, "Yes " * 50, "No.", "p.jsonl", 2)]
    enc, skipped = encode_preferences(tokenizer, prefs, TruncationRules(max_response_tokens=8,
                                                                        response_overflow="skip"))
    assert len(enc) == 1 and skipped == {"response_too_long": 1}
    assert tokenizer.decode(enc[0].chosen_ids) == "Yes.<|im_end|>"
    assert tokenizer.decode(enc[0].rejected_ids) == "No.<|im_end|>"
    with pytest.raises(DataError, match="row 2"):
        encode_preferences(tokenizer, prefs, TruncationRules(max_response_tokens=8, response_overflow="error"))
