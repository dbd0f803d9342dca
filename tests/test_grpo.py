"""GRPO math with hand-computed numbers, and the script end to end on the tiny toy task."""

import math
import sys

import pytest
import torch

from common import Rollout, read_jsonl
from conftest import REPO, run_script
from grpo_logprob import (END_OF_REASONING, aggregate_loss, all_equal_groups, answer_logprob_score, clipped_policy_loss,
                          fill_failed, group_advantages, importance_weights, kl_k3, loss_normalizer, normalize_rewards,
                          parse_reward_weights, perplexity_rewards, reasoning_mask, reasoning_token_count, scoring_texts)


# --- advantages -------------------------------------------------------------------------------
def test_group_advantages_group_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards, "group", eps=1e-4)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.577350
    a = 0.5 / (0.5773503 + 1e-4)
    assert torch.allclose(adv[0], torch.tensor([a, -a, -a, a]), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))  # all-equal group carries no signal


def test_group_advantages_batch_std_and_none():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # batch std over all 8 rewards (mean 0.75): sqrt((6 * 0.0625 + 2 * 0.5625) / 7) = 0.462910
    a = 0.5 / (0.4629100 + 1e-4)
    adv = group_advantages(rewards, "batch", eps=1e-4)
    assert torch.allclose(adv[0], torch.tensor([a, -a, -a, a]), atol=1e-6)
    adv = group_advantages(rewards, "batch", eps=1e-4, batch_std=1.0)  # std given by the caller (all ranks)
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / 1.0001, atol=1e-6)
    assert torch.equal(group_advantages(rewards, "none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_all_equal_groups_get_exactly_zero_advantage():
    rewards = torch.tensor([[-110.537] * 8, [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]])  # float32
    # float32 rounds the mean of eight -110.537 one unit in the last place off: the plain formula
    # gives every member the same non-zero advantage (-0.07 to -0.13, by summation order)
    plain = (rewards[:1] - rewards[:1].mean(1, keepdim=True)) / (rewards[:1].std(1, keepdim=True) + 1e-4)
    assert torch.all(plain != 0)
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, scale)
        assert torch.equal(adv[0], torch.zeros(8)) and adv.dtype == torch.float32
    # the other group is untouched: mean 0.5, unbiased std sqrt(8 * 0.25 / 7) = 0.534522
    a = 0.5 / (0.5345225 + 1e-4)
    assert torch.allclose(group_advantages(rewards, "group")[1], torch.tensor([a, -a, -a, a, a, -a, -a, a]), atol=1e-6)
    # a group that fill_failed filled with its one valid reward, and a group of one sample
    filled = fill_failed(torch.tensor([[-3.3, 0.0, 0.0]]), torch.tensor([[True, False, False]]))
    assert torch.equal(group_advantages(filled), torch.zeros(1, 3))
    assert torch.equal(group_advantages(torch.tensor([[2.5]])), torch.zeros(1, 1))
    # frac_reward_zero_std counts with the same test
    assert all_equal_groups(rewards).tolist() == [True, False] and all_equal_groups(filled).tolist() == [True]


# --- clipped loss and KL ----------------------------------------------------------------------
def test_clipped_policy_loss_hand_numbers():
    # ratios 1.5, 0.5, 1.0 for A = +1 (row 0) and A = -1 (row 1); eps 0.2
    old = torch.zeros(2, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]])).requires_grad_()
    loss, low, high = clipped_policy_loss(lp, old, torch.tensor([1.0, -1.0]), 0.2, 0.2)
    # A=+1: -min(s, clip(s)) -> -1.2 (clipped), -0.5, -1.0;  A=-1: -min(-s, -clip(s)) -> 1.5, 0.8 (clipped), 1.0
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, -1.0], [1.5, 0.8, 1.0]]), atol=1e-6)
    assert high.tolist() == [[True, False, False], [False, False, False]]
    assert low.tolist() == [[False, False, False], [False, True, False]]
    loss.sum().backward()
    # clipped tokens get no gradient; elsewhere d(-s A)/d lp = -s A
    assert torch.allclose(lp.grad, torch.tensor([[0.0, -0.5, -1.0], [1.5, 0.0, 1.0]]), atol=1e-6)


def test_clip_higher_at_the_clip():
    # eps_low 0.2, eps_high 0.28, A = +2: ratios 1.27 (just inside 1 + 0.28) and 1.29 (just outside)
    lp = torch.log(torch.tensor([[1.27, 1.29]])).requires_grad_()
    loss, low, high = clipped_policy_loss(lp, torch.zeros(1, 2), torch.tensor([2.0]), 0.2, 0.28)
    # inside: -s A = -2.54; outside: -(1 + 0.28) A = -2.56, a constant
    assert torch.allclose(loss, torch.tensor([[-2.54, -2.56]]), atol=1e-6)
    assert high.tolist() == [[False, True]] and low.tolist() == [[False, False]]
    loss.sum().backward()
    # d(-s A)/d lp = -s A = -2.54 inside; no gradient past the clip
    assert torch.allclose(lp.grad, torch.tensor([[-2.54, 0.0]]), atol=1e-6)
    # the clip is asymmetric: with eps_high = eps_low = 0.2 the ratio 1.27 would be clipped at 1.2
    loss, _, high = clipped_policy_loss(lp.detach(), torch.zeros(1, 2), torch.tensor([2.0]), 0.2, 0.2)
    assert high.tolist() == [[True, True]] and torch.allclose(loss, torch.tensor([[-2.4, -2.4]]), atol=1e-6)


def test_kl_k3_hand_number():
    lp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    # d = log 0.5: exp(d) - d - 1 = 0.5 + 0.693147 - 1
    assert math.isclose(kl_k3(lp, ref).item(), 0.193147, rel_tol=1e-5)
    assert kl_k3(lp, lp).item() == 0.0


# --- aggregation ------------------------------------------------------------------------------
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("loss_type,expected", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),             # over the 4 unmasked tokens
    ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4) / 2),  # mean of per-sequence means
    ("seq-mean-token-sum-norm", 10 / (2 * 4)),        # Dr. GRPO: / (sequences * max length 4)
])
def test_loss_aggregations(loss_type, expected):
    norm = loss_normalizer(MASK, loss_type, max_completion_length=4)
    assert math.isclose(aggregate_loss(LOSS, MASK, loss_type, norm).item(), expected, rel_tol=1e-6)


def test_a_fully_masked_completion_still_counts_in_the_sequence_mean():
    """seq-mean-token-mean counts every sampled completion, also one whose mask is empty (the
    truncation or reasoning-only mask): (6/3 + 4 + 0) / 3 = 2.0. Counting only non-empty masks
    would give 3.0; raft_pp.py and reinforce_rej.py use the same definition (their tests)."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    norm = loss_normalizer(mask, "seq-mean-token-mean", max_completion_length=3)
    assert norm == 3.0 and aggregate_loss(loss, mask, "seq-mean-token-mean", norm).item() == 2.0
    non_empty = (mask.sum(1) > 0).sum().item()  # the other definition
    assert non_empty == 2 and aggregate_loss(loss, mask, "seq-mean-token-mean", non_empty).item() == 3.0


@pytest.mark.parametrize("loss_type", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_sum_to_the_batch_loss(loss_type):
    """Gradient accumulation must not change the objective: the normalizer is the whole batch's."""
    torch.manual_seed(0)
    loss = torch.rand(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    norm = loss_normalizer(mask, loss_type, 5)
    whole = aggregate_loss(loss, mask, loss_type, norm)
    parts = sum(aggregate_loss(loss[i:i + 2], mask[i:i + 2], loss_type, norm) for i in range(0, 6, 2))
    assert torch.allclose(whole, parts, atol=1e-6)
    # and the per-micro-batch normalization that this avoids is really different
    if loss_type == "token-mean":
        naive = sum(aggregate_loss(loss[i:i + 2], mask[i:i + 2], loss_type, mask[i:i + 2].sum().item()) / 3
                    for i in range(0, 6, 2))
        assert not torch.allclose(whole, naive, atol=1e-4)


def test_parse_reward_weights():
    assert parse_reward_weights("correct=1,format=0.1", ("correct", "format")) == {"correct": 1.0, "format": 0.1}
    assert parse_reward_weights(" correct=-2 ,, format=1e-1", ("correct", "format")) == {"correct": -2.0, "format": 0.1}
    for spec in ("corect=1", "correct", "correct=", "correct=x", "correct=1=2", "correct=nan", "correct=inf"):
        with pytest.raises(SystemExit, match=r"each term is name=weight with name in \['correct', 'format'\] and a "):
            parse_reward_weights(spec, ("correct", "format"))


# --- log-prob and perplexity rewards ----------------------------------------------------------
def test_answer_logprob_score_variants_hand_numbers():
    lp = torch.log(torch.tensor([0.5, 0.25]))
    assert math.isclose(answer_logprob_score(lp, "sum"), math.log(0.125), rel_tol=1e-6)  # -2.0794
    assert math.isclose(answer_logprob_score(lp, "mean"), math.log(0.125) / 2, rel_tol=1e-6)
    assert math.isclose(answer_logprob_score(lp, "prob"), 0.375, rel_tol=1e-6)  # (0.5 + 0.25) / 2


def test_perplexity_rewards_hand_numbers():
    # improved: p = 0.5, 0.5 -> PPL 2; baseline: p = 0.25, 0.25 -> PPL 4
    r = perplexity_rewards(torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.25])))
    assert math.isclose(r["ppl_relative"], 0.5, rel_tol=1e-6)  # 1 - 2/4
    assert math.isclose(r["ppl_absolute"], 0.5, rel_tol=1e-6)  # 1/2
    assert math.isclose(r["ppl_hybrid"], 0.5, rel_tol=1e-6)
    # reasoning that makes the answer less likely: relative is floored at 0
    r = perplexity_rewards(torch.log(torch.tensor([0.25])), torch.log(torch.tensor([0.5])))
    assert r["ppl_relative"] == 0.0 and math.isclose(r["ppl_hybrid"], 0.125, rel_tol=1e-6)


def test_normalize_rewards_hand_numbers():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    assert torch.allclose(normalize_rewards(r, "minmax", "group"), torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(normalize_rewards(r, "minmax", "batch"), torch.tensor([[0.0, 0.25, 0.5], [1.0, 1.0, 1.0]]))
    z = normalize_rewards(r, "zscore", "group", eps=0.0)
    assert torch.allclose(z[0], torch.tensor([-1.0, 0.0, 1.0])) and torch.all(z[1] == 0)  # std of [1,2,3] is 1
    assert torch.equal(normalize_rewards(r, "none", "group"), r)


def test_normalize_rewards_eps_hand_numbers():
    # default eps 1e-6: [1, 2, 3] (std 1) -> (r - 2) / 1.000001
    z = normalize_rewards(torch.tensor([[1.0, 2.0, 3.0]]), "zscore", "group")
    assert torch.allclose(z, torch.tensor([[-1.0, 0.0, 1.0]]) / 1.000001, atol=1e-7)
    # a spread of the order of eps: [0, 2e-6] has std sqrt(2) 1e-6, so +-1e-6 / (2.414214e-6) = +-0.414214
    z = normalize_rewards(torch.tensor([[0.0, 2e-6]]), "zscore", "group")
    assert torch.allclose(z, torch.tensor([[-0.414214, 0.414214]]), atol=1e-5)
    # minmax divides by the span, at least eps: [0, 1e-7] -> [0, 0.1]
    assert torch.allclose(normalize_rewards(torch.tensor([[0.0, 1e-7]]), "minmax", "group"), torch.tensor([[0.0, 0.1]]))


def test_normalize_rewards_gives_an_all_equal_float32_group_exactly_zero():
    """One prompt per process, eight equal log-prob rewards in float32: the float32 mean is one unit in
    the last place off (1.5e-5), the std 1.6e-5, so (r - mean) / (std + eps) was -0.88 for every member.
    With --scale_rewards batch such offsets reach the advantages of the other groups."""
    r = torch.full((1, 8), -110.53689575195312)
    plain = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)
    assert torch.allclose(plain, torch.full((1, 8), -0.8814), atol=1e-3)  # the number the formula alone gives
    for how in ("zscore", "minmax"):
        for scope in ("group", "batch"):
            out = normalize_rewards(r, how, scope)
            assert torch.equal(out, torch.zeros(1, 8)) and out.dtype == torch.float32, (how, scope)
    # next to a group with a spread: its values are the plain formula's, the flat group stays 0
    two = torch.cat([r, torch.tensor([[1.0, 2.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0]])])
    z = normalize_rewards(two, "zscore", "group", eps=0.0)
    # second group: mean 2, unbiased std sqrt(2 / 7) = 0.534522
    assert torch.equal(z[0], torch.zeros(8))
    assert torch.allclose(z[1], torch.tensor([-1.870829, 0, 1.870829, 0, 0, 0, 0, 0]), atol=1e-5)


def test_fill_failed_gives_the_group_minimum():
    r = torch.tensor([[-3.0, -1.0, 99.0], [7.0, 8.0, 9.0]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    assert torch.equal(fill_failed(r, valid), torch.tensor([[-3.0, -1.0, -3.0], [0.0, 0.0, 0.0]]))


def test_reward_terms_hand_numbers():
    """The reward assembly of main(): each term from the scores and the log-probs, the debiased log-prob
    reward subtracting the no-reasoning score, and a completion without "</think>" filled with its
    group's lowest valid answer-blind reward (never its own, never 0 when others are valid)."""
    from grading import Score
    from grpo_logprob import Args, reward_terms

    scores = [Score(1.0, 1.0, "5", 0.5, poem={"reward": 0.25}), Score(0.0, 0.0, None), Score(None, 1.0, "x")]
    valid = torch.tensor([True, True, False])
    with_r = [torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.8])), None]  # sums -1.386294, -0.223144
    base = [torch.log(torch.tensor([0.25, 0.5]))] * 3  # -2.079442
    ppl = [torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25])), None]  # PPL 2 and 4
    weights = dict.fromkeys(["correct", "format", "code", "poem", "logprob", "ppl_absolute", "ppl_relative"], 1.0)
    terms = reward_terms(weights, scores, valid, with_r, base, ppl, [torch.log(torch.tensor([0.25]))] * 3, Args(), 3)
    assert terms["correct"].tolist() == [1.0, 0.0, 0.0] and terms["format"].tolist() == [1.0, 0.0, 1.0]
    assert terms["code"].tolist() == [0.5, 0.0, 0.0] and terms["poem"].tolist() == [0.25, 0.0, 0.0]
    assert torch.allclose(terms["logprob"], torch.tensor([-1.386294, -0.223144, -1.386294]))
    # 1/PPL: 0.5, 0.25 and the group's lowest for the third; relative max(0, 1 - PPL/4): 0.5, 0, then 0
    assert torch.allclose(terms["ppl_absolute"], torch.tensor([0.5, 0.25, 0.25]))
    assert torch.allclose(terms["ppl_relative"], torch.tensor([0.5, 0.0, 0.0]))
    debiased = reward_terms({"logprob": 1.0}, scores, valid, with_r, base, ppl, ppl, Args(logprob_debias=True), 3)
    # minus the no-reasoning score: -1.386294 + 2.079442 = 0.693147, -0.223144 + 2.079442 = 1.856298
    assert torch.allclose(debiased["logprob"], torch.tensor([0.693147, 1.856298, 0.693147]))
    mean = reward_terms({"logprob": 1.0}, scores, valid, with_r, base, ppl, ppl, Args(logprob_variant="mean"), 3)
    assert torch.allclose(mean["logprob"], torch.tensor([-0.693147, -0.223144, -0.693147]))
    # two groups of two: each missing marker takes its own group's lowest valid reward
    two = reward_terms({"logprob": 1.0}, scores + scores[:1], torch.tensor([True, False, False, True]),
                       [with_r[0], None, None, with_r[1]], base + base[:1], ppl, ppl, Args(), 2)
    assert torch.allclose(two["logprob"], torch.tensor([-1.386294, -1.386294, -0.223144, -0.223144]))


def test_importance_weights_hand_numbers():
    old_sampler = torch.zeros(1, 3)
    old_trainer = torch.log(torch.tensor([[0.5, 1.5, 4.0]]))
    mask = torch.ones(1, 3)
    assert torch.allclose(importance_weights(old_trainer, old_sampler, mask, "truncate", "token", 2.0, 0.5),
                          torch.tensor([[0.5, 1.5, 2.0]]))
    assert torch.allclose(importance_weights(old_trainer, old_sampler, mask, "mask", "token", 2.0, 0.6),
                          torch.tensor([[0.0, 1.5, 0.0]]))
    # sequence level: the product 0.5 * 1.5 * 4 = 3 for every token, truncated at 2
    assert torch.allclose(importance_weights(old_trainer, old_sampler, mask, "truncate", "sequence", 2.0, 0.5),
                          torch.full((1, 3), 2.0))
    # masked-out positions do not enter the sequence product
    assert torch.allclose(importance_weights(old_trainer, old_sampler, torch.tensor([[1.0, 1.0, 0.0]]), "truncate",
                                             "sequence", 9.0, 0.5), torch.full((1, 3), 0.75))


# --- regression tests: the defects of the released code of "Eliciting Reasoning in LLMs Using
# Logprob-Based Rewards", which must not come back ---------------------------------------------
def test_defect1_end_of_reasoning_marker_is_not_a_tab(toy):
    """That code wrote the marker "<\\think>": "\\t" is a TAB, it never matched, and almost every
    completion was masked out. Our reasoning mask must cover the reasoning of a real completion."""
    from transformers import AutoTokenizer

    assert END_OF_REASONING == "</think>" and "\t" not in END_OF_REASONING
    tok = AutoTokenizer.from_pretrained(toy / "model")
    text = "\n3+4=7\n7-2=5\n</think>\n<answer>5</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rollout = Rollout([1], ids, [0.0] * len(ids), text, "stop")
    mask, found = reasoning_mask(tok, [rollout], len(ids))
    reasoning_tokens = len(tok("\n3+4=7\n7-2=5\n</think>", add_special_tokens=False)["input_ids"])
    assert found.item() and reasoning_tokens - 1 <= mask.sum().item() <= reasoning_tokens
    assert mask.sum().item() > len(ids) / 2  # the defect masked nearly everything


def test_reasoning_mask_found_on_characters_whatever_the_tokenization(toy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy / "model")
    text = "\n3 + 4 = 7\n</think>\n<answer>7</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    k = reasoning_token_count(tok, ids)
    # Qwen's pre-tokenizer splits it "</", "think", ">\n": the token holding the marker's last
    # character is the last reasoning token (here it also carries the newline)
    assert [tok.decode([i]) for i in ids[k - 3:k]] == ["</", "think", ">\n"]
    assert "</think>" in tok.decode(ids[:k]) and "</think>" not in tok.decode(ids[:k - 1])
    # the same text where "</think>" is one added token
    tok.add_tokens(["</think>"])
    ids2 = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids2) < len(ids)
    k2 = reasoning_token_count(tok, ids2)
    assert tok.convert_ids_to_tokens(ids2[k2 - 1]) == "</think>"
    assert reasoning_token_count(tok, tok("no marker here", add_special_tokens=False)["input_ids"]) is None


def test_defect2_reward_sign_more_likely_answer_scores_higher():
    """Its reward was a min-max of |sum log p|: the least likely gold answer got the highest
    reward. Ours must rank a more likely reference answer higher under every variant and norm."""
    likely, unlikely = torch.log(torch.tensor([0.9, 0.8])), torch.log(torch.tensor([0.2, 0.1]))
    base = torch.log(torch.tensor([0.3, 0.3]))
    for variant in ("sum", "mean", "prob"):
        r = torch.tensor([[answer_logprob_score(likely, variant), answer_logprob_score(unlikely, variant)]])
        for how in ("none", "zscore", "minmax"):
            normed = normalize_rewards(r, how, "group")
            assert normed[0, 0] > normed[0, 1], (variant, how)
    hi, lo = perplexity_rewards(likely, base), perplexity_rewards(unlikely, base)
    assert all(hi[k] > lo[k] for k in ("ppl_relative", "ppl_absolute", "ppl_hybrid"))


def test_defect3_reasoning_is_read_from_a_completion_that_starts_inside_it():
    """It looked for "<think>" inside the completion, but it lives in the prompt's prefill,
    so the reasoning was empty and every member of a group scored the same."""
    a = "\n3+4=7\n</think>\n<answer>7</answer>"
    b = "\n3+4=8\n</think>\n<answer>8</answer>"
    (ra, cue, cont), (rb, _, _) = scoring_texts(a, "7", "tag"), scoring_texts(b, "7", "tag")
    assert ra == "\n3+4=7\n" and rb == "\n3+4=8\n" and ra != rb
    assert cue == "</think>\n" and cont == "<answer>7</answer>"
    assert scoring_texts("no marker at all", "7", "tag")[0] is None
    assert scoring_texts("so x = 2, \\boxed{2}", "2", "boxed") == ("so x = 2, ", "\\boxed{", "2}")


def test_logprob_reward_prefers_reasoning_that_leads_to_the_answer(toy):
    """End to end on the toy model: after a correct chain the reference answer is likelier than
    after a chain that ends elsewhere, and the no-reasoning baseline is shared by the group."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import load_tasks
    from grpo_logprob import reference_answer_logprobs

    tok = AutoTokenizer.from_pretrained(toy / "model")
    model = AutoModelForCausalLM.from_pretrained(toy / "model")
    row = next(r for r in load_tasks(toy / "test.jsonl") if len(r["metadata"]["steps"]) == 2)
    start, (s1, s2) = row["metadata"]["start"], row["metadata"]["steps"]
    v1 = start + int(s1[1:]) if s1[0] == "+" else start - int(s1[1:])
    gold = int(row["answer"])
    right = f"\n{start}{s1}={v1}\n{v1}{s2}={gold}\n</think>\n<answer>{gold}</answer>"
    wrong = f"\n{start}{s1}={v1}\n{v1}{s2}={gold + 3}\n</think>\n<answer>{gold + 3}</answer>"
    with_r, base = reference_answer_logprobs(model, tok, [row, row, row], [right, wrong, "no marker"], tok.pad_token_id)
    assert with_r[2] is None and torch.equal(base[0], base[1])
    assert with_r[0].sum() > with_r[1].sum()
    # without the baseline: the same with-reasoning scores, no baseline pass
    alone, none = reference_answer_logprobs(model, tok, [row, row, row], [right, wrong, "no marker"], tok.pad_token_id,
                                            with_baseline=False)
    assert none == [None, None, None] and alone[2] is None
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(alone[:2], with_r[:2]))


# --- the script end to end --------------------------------------------------------------------
def grpo_cmd(toy, out, name, *extra):
    return ["grpo_logprob.py", "--model", str(toy / "model"), "--train_file", str(toy / "train.jsonl"),
            "--test_file", str(toy / "test.jsonl"), "--output_dir", str(out), "--run_name", name,
            "--prompts_per_step", "4", "--num_generations", "4", "--max_completion_length", "48",
            "--eval_limit", "16", "--log_rollouts_every", "1", *extra]


TIMING_KEYS = ("time/", "tokens_per_second", "memory/")


def test_grpo_end_to_end_hf(toy, tmp_path):
    out = run_script(grpo_cmd(toy, tmp_path, "hf", "--sampler", "hf", "--total_steps", "3", "--num_iterations", "2",
                              "--beta", "0.01"))
    run = tmp_path / "hf"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[-1]
    for key in ("reward", "reward_std", "rewards/correct/mean", "rewards/format/mean", "completions/mean_length",
                "completions/clipped_ratio", "frac_reward_zero_std", "entropy", "kl", "clip_ratio/low_mean",
                "loss", "grad_norm", "tokens_per_second", "time/sample", "time/update"):
        assert key in metrics[1], key
    assert metrics[2]["kl"] > 0  # beta > 0: a reference model is loaded and the policy moved away from it
    assert "test accuracy" in out.stdout and "step 0:" in out.stdout
    rollouts = read_jsonl(run / "rollouts.jsonl")
    assert len(rollouts) == 3 * 16 and {"prompt", "completion", "reward"} <= set(rollouts[0])
    evals = read_jsonl(run / "eval" / "step_000003.jsonl")
    assert len(evals) == 16 and {"id", "completions", "correct", "answer"} <= set(evals[0])
    assert math.isclose(sum(e["correct"][0] for e in evals) / 16, metrics[-1]["eval/accuracy"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run / "final")
    AutoTokenizer.from_pretrained(run / "final")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_3"]


def test_logprob_reward_end_to_end_under_accelerate_launch(toy, tmp_path):
    """The log-prob reward alone, debiased, z-scored, scored by the initial model, through `accelerate launch`.
    Which tokens it trains: test_update_steps.py::test_reasoning_only_loss_trains_exactly_the_reasoning_tokens."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    run_script(grpo_cmd(toy, tmp_path, "lp", "--sampler", "hf", "--total_steps", "2", "--reward", "logprob=1",
                        "--logprob_scorer", "initial", "--logprob_debias", "--reward_norm", "zscore"),
               launcher=accelerate, env={"HF_HUB_OFFLINE": "1"})
    metrics = read_jsonl(tmp_path / "lp" / "metrics.jsonl")
    step = metrics[1]
    assert "rewards/correct/mean" not in step and "rewards/logprob/mean" in step and "rewards/no_marker" in step
    assert 0 < step["loss_tokens_frac"] < 1  # the answer after </think> gets no gradient
    assert "eval/gold_logprob" in metrics[0] and metrics[0]["eval/gold_logprob"] < 0
    rollout = read_jsonl(tmp_path / "lp" / "rollouts.jsonl")[0]
    assert "reward_logprob" in rollout and "reward_correct" not in rollout


def test_hybrid_reward_with_is_correction_end_to_end(toy, tmp_path):
    run_script(grpo_cmd(toy, tmp_path, "hy", "--sampler", "hf", "--total_steps", "2",
                        "--reward", "correct=1,logprob=0.1,ppl_hybrid=0.5", "--is_correction", "truncate",
                        "--loss_type", "seq-mean-token-sum-norm", "--scale_rewards", "none"))
    step = read_jsonl(tmp_path / "hy" / "metrics.jsonl")[1]
    assert step["loss_tokens_frac"] == 1.0  # a rule term reads the answer: the whole completion trains
    assert {"rewards/correct/mean", "rewards/logprob/mean", "rewards/ppl_hybrid/mean"} <= set(step)
    assert 0 < step["is/mean_weight"] <= 2.0 and step["is/zeroed_frac"] == 0.0


def test_poem_completion_trains_on_the_poem_rule_and_logprob_rewards(toy, tmp_path):
    """Poem rows have no correctness check: the poem rule reward and the log-prob of the gold ending."""
    data = tmp_path / "poem.jsonl"
    run_script(["data_prep.py", "poem", "--source", str(REPO / "tests" / "fixtures" / "poem.jsonl"), "--out", str(data)])
    # the toy model's context is 512 tokens and the poem prompts are 482 to 531: with 16 completion
    # tokens one of the three fits, and the other two are dropped with a warning
    cmd = grpo_cmd(toy, tmp_path, "poem", "--sampler", "hf", "--total_steps", "2", "--reward", "poem=1,logprob=1",
                   "--max_completion_length", "16")
    cmd[cmd.index("--train_file") + 1] = cmd[cmd.index("--test_file") + 1] = str(data)
    out = run_script(cmd)
    assert f"warning: {data}: dropped 2 of 3 prompts longer than 496 tokens" in out.stdout
    metrics = read_jsonl(tmp_path / "poem" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    step = metrics[1]
    assert "rewards/logprob/mean" in step and step["train/accuracy"] is None  # no checker: NaN, logged as null
    assert {"rewards/poem/mean", "rewards/poem/similarity", "rewards/poem/form", "rewards/poem/rhyme",
            "rewards/poem/syllables"} <= set(step)
    assert step["loss_tokens_frac"] == 1.0  # the poem term reads the written ending: the whole completion trains
    assert {"eval/poem/similarity", "eval/poem/reward"} <= set(metrics[0])
    with pytest.raises(AssertionError, match="no correctness check"):
        run_script([*cmd[:cmd.index("--run_name") + 1], "poem2", *cmd[cmd.index("--run_name") + 2:], "--reward",
                    "correct=1"])


def test_code_rows_train_through_the_sandboxed_reward(toy, tmp_path):
    """The toy model's programs fail; the point is the reward path: programs run in the sandbox, and the
    logged rewards are what score_completions gives the logged completions."""
    from common import load_tasks
    from grading import score_completions

    data = tmp_path / "code.jsonl"
    run_script(["data_prep.py", "taco", "--source", str(REPO / "tests" / "fixtures" / "taco.jsonl"), "--out", str(data)])
    cmd = grpo_cmd(toy, tmp_path, "code", "--sampler", "hf", "--total_steps", "2",
                   "--reward", "correct=1,code=0.5,format=0.1")
    cmd[cmd.index("--train_file") + 1] = cmd[cmd.index("--test_file") + 1] = str(data)
    run_script(cmd)
    metrics = read_jsonl(tmp_path / "code" / "metrics.jsonl")
    step = metrics[2]
    assert {"rewards/code/mean", "rewards/correct/mean", "rewards/code_timeouts"} <= set(step)
    assert step["rewards/errors"] == 0 and step["train/accuracy"] is not None
    assert {"eval/code_tests_passed", "eval/code_timeouts"} <= set(metrics[0])
    rows = {r["id"]: r for r in load_tasks(data)}
    rollouts = read_jsonl(tmp_path / "code" / "rollouts.jsonl")
    scores, _ = score_completions([rows[r["id"]] for r in rollouts], [r["completion"] for r in rollouts])
    assert [r["reward_code"] for r in rollouts] == pytest.approx([s.tests_passed for s in scores])
    assert [r["correct"] for r in rollouts] == [s.correct for s in scores]
    with pytest.raises(AssertionError, match=r"bubblewrap \(bwrap\) is not installed: install it"):
        run_script([*cmd[:cmd.index("--run_name") + 1], "code2", *cmd[cmd.index("--run_name") + 2:]],
                   env={"PATH": str(tmp_path)})  # no bwrap there: the script refuses before training


def test_resume_logs_the_same_metrics(toy, tmp_path):
    """N steps straight == k steps, stop, resume, N - k steps (every metric but wall-clock timings)."""
    common = ("--sampler", "vllm", "--total_steps", "4", "--save_every", "0", "--eval_every", "2",
              "--lr_schedule", "cosine")
    out = run_script(grpo_cmd(toy, tmp_path, "straight", *common))
    # A clean end: no traceback from vLLM's exit handler, no expected-noise lines from the pushes.
    assert "Traceback" not in out.stderr and "Failed to load weights" not in out.stderr
    run_script(grpo_cmd(toy, tmp_path, "resumed", *common, "--stop_at_step", "2"))
    assert [m["step"] for m in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [0, 1, 2]
    assert not (tmp_path / "resumed" / "final").exists()
    run_script(grpo_cmd(toy, tmp_path, "resumed", *common, "--resume"))

    def strip(m):
        return {k: v for k, v in m.items() if not k.startswith(TIMING_KEYS)}

    straight = [strip(m) for m in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]
    resumed = [strip(m) for m in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
    assert [m["step"] for m in resumed] == [0, 1, 2, 3, 4]
    assert straight == resumed
    assert read_jsonl(tmp_path / "straight" / "rollouts.jsonl") == read_jsonl(tmp_path / "resumed" / "rollouts.jsonl")


def test_reasoning_mask_takes_its_marker(toy):
    """reasoning_mask passes its marker on: with "=7" the reasoning ends at the token holding "7"."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy / "model")
    text = "\n3+4=7\n7-2=5\n</think>\n<answer>5</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rollout = Rollout([1], ids, [0.0] * len(ids), text, "stop")
    for marker in ("=7", "=5", END_OF_REASONING):
        mask, found = reasoning_mask(tok, [rollout], len(ids), marker)
        k = reasoning_token_count(tok, ids, marker)
        assert found.item() and mask.sum().item() == k and marker in tok.decode(ids[:k])
        assert marker not in tok.decode(ids[:k - 1])
    mask, found = reasoning_mask(tok, [rollout], len(ids), "=8")
    assert found.dtype == torch.bool and found.tolist() == [False] and mask.sum().item() == 0  # bool: it indexes
