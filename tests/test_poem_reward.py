"""The poem rule reward (grading.poem_components): each component on hand-written poems with
hand-computed scores, the weighted sum, and poem rows through score_completions and the grpo term."""

import pytest
import torch

from grading import POEM_WEIGHTS, poem_components, score_completions, syllable_count, words_rhyme

BEGIN = "I wandered through the night\nBeneath the silver moon"
GOLD = "And found a hidden light\nThat faded all too soon"  # ABAB with the beginning


def test_similarity_is_chrf_of_the_endings():
    # chrF: character 1..6-grams, beta 2, spaces removed, averaged over the orders both sides have.
    # "ab" against "abc": order 1: precision 2/2, recall 2/3; order 2: 1/1, 1/2; no trigram in "ab".
    # P = 1, R = (2/3 + 1/2) / 2 = 7/12, F = 5 P R / (4 P + R) = (35/12) / (55/12) = 7/11
    assert poem_components("ab", "abc", "", "free verse")["similarity"] == pytest.approx(7 / 11)
    # "cab" against "cat": orders 1-3 precision = recall = 2/3, 1/2, 0 -> P = R = 7/18, F = P
    assert poem_components("cab", "cat", "", "free verse")["similarity"] == pytest.approx(7 / 18)
    assert poem_components(GOLD, GOLD, BEGIN, "free verse")["similarity"] == 1.0
    assert poem_components("xyz", "abc", "", "free verse")["similarity"] == 0.0


@pytest.mark.parametrize("form,begin_lines,generated_lines,expected", [
    ("sonnet", 2, 12, 1.0),
    ("sonnet", 2, 10, 1 - 2 / 14),  # 12 lines of 14
    ("Sonnet", 2, 28, 0.0),  # 30 lines: max(0, 1 - 16/14)
    ("quatrain", 2, 2, 1.0),
    ("quatrain", 2, 4, 0.5),  # 6 of 4
    ("octave", 3, 3, 0.75),  # 6 of 8
    ("free verse", 2, 40, 1.0),  # unconstrained
    ("hymn stanza", 4, 1, 1.0),  # a form without a fixed length: unconstrained too
])
def test_form_counts_the_lines_of_the_whole_poem(form, begin_lines, generated_lines, expected):
    begin = "\n".join(["word"] * begin_lines)
    generated = "\n\n".join(["word"] * generated_lines)  # stanza breaks (blank lines) do not count
    assert poem_components(generated, "word", begin, form)["form"] == pytest.approx(expected)


def test_rhymes_come_from_cmudict():
    assert words_rhyme("night", "light") and words_rhyme("moon", "dune") and words_rhyme("gold", "hold")
    assert not words_rhyme("moon", "light") and not words_rhyme("night", "star")
    assert not words_rhyme("night", "night")  # repeating a word is not a rhyme
    assert not words_rhyme("zorblax", "borblax")  # not in CMUdict


@pytest.mark.parametrize("ending,expected", [
    (GOLD, 1.0),
    ("And saw a shining star\nThat glowed above the dune", 0.5),  # star/night no, dune/moon yes
    ("And caught a glimpse of bright\nA half-remembered tune", 1.0),  # a different ending, same scheme
    ("And saw a sight", 0.5),  # line 4 is missing: its pair cannot rhyme
    ("And walked into the night\nBeneath the moon", 0.0),  # the same words again
])
def test_rhyme_keeps_the_gold_poems_scheme(ending, expected):
    # the gold poem's pairs at most 3 lines apart that touch the ending: (night, light) and (moon, soon);
    # (moon, light), (night, soon), (light, soon) do not rhyme
    assert poem_components(ending, GOLD, BEGIN, "quatrain")["rhyme"] == expected


def test_rhyme_is_unconstrained_when_the_gold_has_none():
    assert poem_components("Some words\nMore words", "Nothing else\nWas there", "A line\nAnother", "free verse")[
        "rhyme"] == 1.0


def test_syllables_line_by_line_against_the_gold():
    assert syllable_count("The cat sat on the mat") == 6 and syllable_count("Shall I compare thee to a summer's day?") == 10
    assert syllable_count("glorpe zorblax") == 3  # unknown words: vowel groups, a final silent e dropped
    gold = "The cat sat on the mat\nA dog ran in the fog"  # 6 and 6
    parts = lambda ending: poem_components(ending, gold, "", "free verse")["syllables"]  # noqa: E731
    assert parts(gold) == 1.0
    assert parts("The cat sat\nA dog ran in the fog") == 0.75  # (1 - 3/6 + 1) / 2
    assert parts("The cat sat") == 0.25  # (0.5 + 0) / 2: the missing line scores 0
    assert parts("The cat sat on the mat and the hat\nA dog ran in the fog\nextra line") == 0.75  # 9 of 6


def test_weighted_sum_and_no_answer():
    assert POEM_WEIGHTS == {"similarity": 0.4, "form": 0.2, "rhyme": 0.2, "syllables": 0.2}
    assert poem_components(GOLD, GOLD, BEGIN, "quatrain") == {"similarity": 1.0, "form": 1.0, "rhyme": 1.0,
                                                               "syllables": 1.0, "reward": 1.0}
    # "cab" for "cat", a quatrain: similarity 7/18, form 1 line of 4 = 0.25, no rhyme pair (1), syllables 1 of 1
    c = poem_components("cab", "cat", "", "quatrain")
    assert c["form"] == 0.25 and c["rhyme"] == 1.0 and c["syllables"] == 1.0
    assert c["reward"] == pytest.approx(0.4 * 7 / 18 + 0.2 * (0.25 + 1 + 1))
    assert poem_components(None, GOLD, BEGIN, "sonnet") == dict.fromkeys([*POEM_WEIGHTS, "reward"], 0.0)


def poem_row():
    return {"id": "p", "task": "poem", "prompt": [], "answer": GOLD,
            "metadata": {"form": "quatrain", "poem_start": BEGIN, "answer_style": "tag"}}


def test_poem_rows_through_score_completions_and_the_grpo_term():
    from grpo_logprob import reward_terms

    texts = [f"I keep the rhymes.</think>\n<answer>{GOLD}</answer>",
             "I keep the rhymes.</think>\n<answer>And saw a sight</answer>",
             "no answer at all"]
    scores, errors = score_completions([poem_row()] * 3, texts)
    assert errors == 0 and [s.correct for s in scores] == [None] * 3  # still no correctness check
    assert scores[0].poem["reward"] == 1.0 and scores[2].poem["reward"] == 0.0
    # "And saw a sight": similarity = chrF, form 3 of 4 lines = 0.75, rhyme 1/2, syllables (4/6 + 0) / 2
    one = scores[1].poem
    assert (one["form"], one["rhyme"], one["syllables"]) == (0.75, 0.5, pytest.approx(1 / 3))
    terms = reward_terms({"poem": 1.0}, scores, torch.ones(3, dtype=torch.bool), None, None, None, None, None, 3)
    assert torch.allclose(terms["poem"], torch.tensor([1.0, one["reward"], 0.0]))
