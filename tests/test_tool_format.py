"""The tool-call text format (grpo_cli/tools/base.py): when a turn ends, what is appended, what is masked."""

from grpo_cli.tools.base import OUTPUT_CLOSE, OUTPUT_OPEN, output_block, output_spans, pending_code

CALL = "```python\nprint(123*456)\n```"


def test_pending_code_is_the_block_just_closed():
    assert pending_code(CALL) == "print(123*456)"
    assert pending_code("x = 1\n" + CALL) == "print(123*456)"
    assert pending_code(CALL + "\n") is None  # the turn ended one token earlier
    assert pending_code("```\n```") is None  # not a python block


def test_an_answered_block_is_not_run_again():
    answered = CALL + output_block("56088\n", None)
    assert pending_code(answered) is None
    assert pending_code(answered + "#### 56088\n```") is None  # a stray fence after the observation
    assert pending_code(answered + CALL) == "print(123*456)"  # a second call


def test_output_block_format_error_and_cut():
    assert output_block("56088\n", None) == "\n```output\n56088\n```\n"
    assert output_block("", None) == f"{OUTPUT_OPEN}(no output)\n{OUTPUT_CLOSE}"
    assert output_block("1\n", "ZeroDivisionError: division by zero") == (
        "\n```output\n1\nZeroDivisionError: division by zero\n```\n"
    )
    cut = output_block("9" * 1000, None, max_chars=10)
    assert cut == "\n```output\n9999999999 ...(cut)\n```\n"


def test_output_spans_cover_exactly_the_observations():
    text = CALL + output_block("56088\n", None) + CALL + output_block("7\n", None) + "#### 7"
    spans = output_spans(text)
    assert [text[a:b] for a, b in spans] == ["\n```output\n56088\n```\n", "\n```output\n7\n```\n"]
    model_written = "".join(text[b:a] for (_, b), (a, _) in zip([(0, 0), *spans], [*spans, (len(text), 0)]))
    assert model_written == CALL + CALL + "#### 7"
