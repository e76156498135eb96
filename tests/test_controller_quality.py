"""The quality proxy on token lists and answer texts."""

import pytest

from controller.quality import answer_accuracy, exit_distribution, final_number, token_agreement


def test_token_agreement_counts_reference_positions():
    assert token_agreement([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert token_agreement([[1, 9, 3]], [[1, 2, 3]]) == pytest.approx(2 / 3)
    assert token_agreement([[1]], [[1, 2, 3, 4]]) == 0.25  # a short output misses the rest
    assert token_agreement([[1, 2, 3, 4, 5]], [[1, 2]]) == 1.0  # the reference sets the length
    # pooled over prompts, weighted by reference tokens
    assert token_agreement([[1, 2], [0, 0, 0, 0]], [[1, 2], [1, 1, 1, 1]]) == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        token_agreement([[1]], [])


def test_answer_accuracy_compares_final_numbers():
    assert final_number("so she has 1,200 apples.\n#### 1200") == "1200"
    assert final_number("The answer is 7.0") == "7"
    assert final_number("no digits") is None
    replies = ["... so 72 in all", "I think 8", "unsure"]
    answers = ["Natalia sold 48+24 = 72 clips.\n#### 72", "#### 9", "#### 3"]
    assert answer_accuracy(replies, answers) == pytest.approx(1 / 3)


def test_exit_distribution_shares():
    assert exit_distribution([[6, 6, 30], [12]]) == {6: 0.5, 12: 0.25, 30: 0.25}
    assert exit_distribution([[]]) == {}
