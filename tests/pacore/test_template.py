"""The synthesis prompt, byte for byte, and how it replaces the last user turn."""

import pytest

from step3vl_pacore.template import render_synthesis, synthesis_messages, user_text

EXPECTED_TWO_REFS = (
    "You are given a problem and a list of reference responses. Your job is to analyze these references and "
    "provide your own response.\n"
    "\n"
    "Original Problem:\n"
    "What is 2+2?\n"
    "\n"
    "Reference Responses:\n"
    "\n"
    "Reference 1:\n"
    "It is 4.\n"
    "\n"
    "Reference 2:\n"
    "\n\nFour, since 2+2=4.\n"
    "\n"
    "\n"
    "Now, based on the original problem and reference responses above, please provide your own comprehensive "
    "solution."
)


def test_rendered_prompt_equals_the_official_text():
    got = render_synthesis("What is 2+2?", ["It is 4.", "\n\nFour, since 2+2=4."])
    assert got == EXPECTED_TWO_REFS


def test_no_references_and_markup_is_not_escaped():
    got = render_synthesis("Is 1 < 2 & 3 > 2?", [])
    assert got == (
        "You are given a problem and a list of reference responses. Your job is to analyze these references and "
        "provide your own response.\n\nOriginal Problem:\nIs 1 < 2 & 3 > 2?\n\nReference Responses:\n\n\n"
        "Now, based on the original problem and reference responses above, please provide your own comprehensive "
        "solution."
    )


def test_last_user_turn_is_replaced_and_the_rest_kept():
    img = object()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Count the shapes."},
                                     {"type": "text", "text": "Answer with a number."}], "name": "u"},
    ]
    out = synthesis_messages(messages, ["5", "6"])
    assert out[:3] == messages[:3]
    assert messages[3]["content"][1]["text"] == "Count the shapes."  # the input is not modified
    turn = out[3]
    assert turn["role"] == "user" and turn["name"] == "u"
    assert turn["content"][0] == {"type": "image", "image": img}
    assert len(turn["content"]) == 2
    assert turn["content"][1] == {"type": "text",
                                  "text": render_synthesis("Count the shapes.\nAnswer with a number.", ["5", "6"])}


def test_string_content_and_image_only_turn():
    out = synthesis_messages([{"role": "user", "content": "Q?"}], ["a"])
    assert out == [{"role": "user", "content": render_synthesis("Q?", ["a"])}]
    img_only = [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}]
    out = synthesis_messages(img_only, ["a"])
    assert out[0]["content"] == [{"type": "image", "image": "x.png"}, {"type": "text", "text": render_synthesis("", ["a"])}]
    assert user_text(img_only[0]["content"]) == ""


def test_no_user_turn_is_an_error():
    with pytest.raises(ValueError, match="no user turn"):
        synthesis_messages([{"role": "system", "content": "hi"}], ["a"])
