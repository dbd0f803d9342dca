"""Every user mistake gets one sentence: the README's table "What you did -> what it says", one case per
row, and more cases of some rows (MORE). Each mistake is found before the run folder is created or a model is
loaded (loading one fails the test; a corrected retry then starts cleanly). Most cases call the script's main()
and read its SystemExit; a few run the real script as a user would (under torchrun with 2 processes, or in
bubblewrap with a folder it cannot write) and check its whole output: the one sentence, no traceback, no run
folder."""

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

import common
import eval as ev
import grpo_logprob
import prime
import raft_pp
import reinforce_rej
import sandbox
from conftest import HANG, REPO, torchrun

MODULES = {"grpo_logprob": grpo_logprob, "raft_pp": raft_pp, "reinforce_rej": reinforce_rej, "prime": prime}


@pytest.fixture(scope="module")
def lengths(toy):
    """Prompt lengths of the toy train and test files, in tokens (the context checks are set from them)."""
    tokenizer, context = common.load_tokenizer(str(toy / "model"))
    count = {}
    for name in ("train", "test"):
        rows = common.load_tasks(toy / f"{name}.jsonl")
        count[name] = [len(ids) for ids in common.encode_prompts(tokenizer, rows)]
    return SimpleNamespace(context=context, **count)


def row(**fields):
    good = {"id": "a", "task": "toy", "prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    return json.dumps({**good, **fields})


class Case:
    """A row of the README table: the label (its first column), the script and its flags, and the sentence."""

    def __init__(self, label, flags, says, script="grpo_logprob", files=None, folder=None, subprocess=False,
                 launcher=None):
        self.label, self.flags, self.says, self.script = label, flags, says, script
        self.files = files or {}  # name -> text, written to the test's folder
        self.folder = folder  # a function that prepares the run folder
        self.launcher = launcher  # how the subprocess starts: None, "torchrun", "no_permission", "read_only"
        self.subprocess = subprocess or launcher is not None


def config(toy, tmp, **changes) -> dict:
    args = grpo_logprob.Args(model=str(toy / "model"), train_file=str(toy / "train.jsonl"),
                             test_file=str(toy / "test.jsonl"), output_dir=str(tmp), run_name="r", sampler="hf")
    return dataclasses.asdict(dataclasses.replace(args, **changes))


def run_with_checkpoint(writers=1, **changes):
    """A run folder as a run leaves it: config.json and a complete checkpoint (its state file and one RNG
    state per process)."""
    def make(toy, tmp):
        ckpt = tmp / "r" / "checkpoints" / "step_2"
        ckpt.mkdir(parents=True)
        (tmp / "r" / "config.json").write_text(json.dumps(config(toy, tmp, **changes)))
        (ckpt / "trainer_state.json").write_text('{"step": 2}')
        for rank in range(writers):
            (ckpt / f"random_states_{rank}.pkl").write_bytes(b"")
    return make


CASES = [
    Case("model path missing (a hub name)", ["--model", "nonexist"],
         "--model nonexist: not a local folder, and the Hugging Face hub has no model of that name or cannot be "
         "reached; pass a model folder (the toy one: data/toy/model) or a hub id such as Qwen/Qwen2.5-Math-1.5B.",
         subprocess=True),
    Case("train file missing", ["--train_file", "{tmp}/tarin.jsonl"],
         "{tmp}/tarin.jsonl: no such file; build it with `python data_prep.py ...` (see README)."),
    Case("model path missing (a folder)", ["--model", "{tmp}/models/final"],
         "--model {tmp}/models/final: no such model folder; build the toy model with `python data_prep.py toy`, or "
         "pass a model folder or a hub id."),
    Case("model folder without a model", ["--model", "{tmp}"],
         "--model {tmp}: not a model folder (no config.json in it); pass a folder written by save_pretrained (e.g. "
         "runs/NAME/final) or a hub id."),
    Case("test file missing", ["--test_file", "{tmp}/nope.jsonl"],
         "{tmp}/nope.jsonl: no such file; build it with `python data_prep.py ...` (see README)."),
    Case("empty data file", ["--train_file", "{tmp}/empty.jsonl"], "{tmp}/empty.jsonl: the file has no rows.",
         files={"empty.jsonl": "\n"}),
    Case("malformed line", ["--train_file", "{tmp}/bad.jsonl"],
         "{tmp}/bad.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes); fix or delete "
         "that line.", files={"bad.jsonl": row() + "\n{oops\n"}),
    Case("a row missing prompt, answer or task", ["--test_file", "{tmp}/rows.jsonl"],
         "{tmp}/rows.jsonl:2: missing field(s) ['answer']; rows need ['id', 'task', 'prompt', 'answer'].",
         files={"rows.jsonl": row() + "\n" + json.dumps({"id": "b", "task": "toy", "prompt": []}) + "\n"}),
    Case("unknown task", ["--train_file", "{tmp}/task.jsonl"],
         "{tmp}/task.jsonl:1: unknown task 'gsm8'; use one of " + ", ".join(common.KNOWN_TASKS) + ".",
         files={"task.jsonl": row(task="gsm8") + "\n"}),
    Case("--num_generations 1 (GRPO)", ["--num_generations", "1"],
         "--num_generations 1: GRPO normalizes each reward within its prompt's group, so it needs at least 2 "
         "completions per prompt."),
    Case("--num_generations 1 (Reinforce-rej)", ["--num_generations", "1"],
         "--num_generations 1: Reinforce-rej keeps the prompts whose samples are both right and wrong, so it needs "
         "at least 2 completions per prompt.", script="reinforce_rej"),
    Case("--num_generations 1 (PRIME)", ["--num_generations", "1"],
         "--num_generations 1: PRIME's leave-one-out baselines average a prompt's other samples, so it needs at "
         "least 2 completions per prompt.", script="prime"),
    Case("--negative_reward of 1 or more (RAFT)", ["--negative_reward", "1"],
         "--negative_reward 1.0 must be below 1, a correct answer's reward: positive samples score above it.",
         script="raft_pp"),
    Case("--prompts_per_step not divisible by the processes", ["--prompts_per_step", "3"],
         "--prompts_per_step 3 cannot be split evenly over 2 processes; make it a multiple of 2.", launcher="torchrun"),
    Case("zero or negative sizes", ["--prompts_per_step", "0"], "--prompts_per_step 0: must be at least 1."),
    Case("zero or negative lengths", ["--max_completion_length", "0"], "--max_completion_length 0: must be at least 1.",
         script="raft_pp"),
    Case("zero or negative temperatures", ["--temperature", "0"], "--temperature 0.0: must be greater than 0.",
         script="prime"),
    Case("a probability outside (0, 1]", ["--top_p", "1.5"], "--top_p 1.5: must be in (0, 1]."),
    Case("negative rates, periods and coefficients", ["--learning_rate", "-1e-5"],
         "--learning_rate -1e-05: must not be negative."),
    Case("a choice that does not exist", ["--loss_type", "token_mean"],
         "invalid choice 'token_mean' for argument '--loss_type'. Expected one of ('token-mean', "
         "'seq-mean-token-mean', 'seq-mean-token-sum-norm').", subprocess=True),
    Case("--resume with no run folder", ["--resume"],
         "--resume: there is no run folder {tmp}/r; check --output_dir and --run_name, or start without --resume."),
    Case("--resume on a folder made with other settings", ["--resume", "--learning_rate", "1e-4"],
         "--resume: {tmp}/r was made with other settings (--learning_rate 5e-05 there, 0.0001 now); resume with the "
         "flags it was started with, or start a new --run_name.", folder=run_with_checkpoint()),
    Case("--resume with another number of processes", ["--resume"],
         "--resume: the checkpoint of step 2 in {tmp}/r was written by 2 process(es), and this run has 1; resume with "
         "as many.", folder=run_with_checkpoint(writers=2)),
    Case("a new start in a folder that holds a run", [],
         "{tmp}/r already holds a run; pass --resume to continue it, or another --run_name.",
         folder=run_with_checkpoint()),
    Case("an output folder that cannot be written", ["--output_dir", "{tmp}/notes.txt/runs"],
         "--output_dir: {tmp}/notes.txt is a file, so {tmp}/notes.txt/runs/r cannot be created; choose another "
         "--output_dir.", files={"notes.txt": "x"}),
    Case("every prompt too long for the context", ["--max_model_len", "{all_too_long}", "--max_completion_length", "8"],
         "{toy}/train.jsonl: every prompt is longer than {room} tokens (the context of {all_too_long} tokens minus "
         "--max_completion_length 8; the shortest has {shortest}); lower --max_completion_length or use a model "
         "with a longer context."),
    Case("a completion length that fills the context", ["--max_model_len", "64", "--max_completion_length", "64"],
         "--max_completion_length 64 leaves no room for a prompt in the model's context of 64 tokens; lower "
         "--max_completion_length (or raise --max_model_len, up to the model's limit)."),
    Case("eval.py: model path missing", ["--model", "nonexist", "--dataset", "{toy}/test.jsonl"],
         "--model nonexist: not a local folder, and the Hugging Face hub has no model of that name or cannot be "
         "reached; pass a model folder (the toy one: data/toy/model) or a hub id such as Qwen/Qwen2.5-Math-1.5B.",
         script="eval"),
    Case("eval.py: every prompt too long for the context",
         ["--model", "{toy}/model", "--dataset", "{toy}/test.jsonl", "--max_model_len", "{test_too_long}",
          "--max_tokens", "8", "--out", "{tmp}/o.jsonl"],
         "{toy}/test.jsonl: every prompt is longer than {test_room} tokens (the context of {test_too_long} tokens "
         "minus --max_tokens 8; the shortest has {test_shortest}); lower --max_tokens or use a model with a longer "
         "context.", script="eval"),
    Case("eval.py: an output folder that cannot be written",
         ["--model", "{toy}/model", "--dataset", "{toy}/test.jsonl", "--out", "{tmp}/notes.txt/o.jsonl"],
         "--out: {tmp}/notes.txt is a file, not a folder; choose another --out.",
         script="eval", files={"notes.txt": "x"}),
]


# more cases of some rows: negative values, and the folders a user cannot write to (a real read-only mount and a
# folder without write permission, both made with bubblewrap: root would write anywhere)
MORE = [
    Case("zero or negative sizes", ["--num_generations", "-2"], "--num_generations -2: must be at least 1.",
         script="reinforce_rej"),
    Case("zero or negative lengths", ["--max_completion_length", "-1"], "--max_completion_length -1: must be at least 1."),
    Case("zero or negative temperatures", ["--temperature", "-0.5"], "--temperature -0.5: must be greater than 0."),
    Case("a probability outside (0, 1]", ["--top_p", "0"], "--top_p 0.0: must be in (0, 1].", script="raft_pp"),
    Case("negative rates, periods and coefficients", ["--kl_coef", "-0.1"], "--kl_coef -0.1: must not be negative.",
         script="raft_pp"),
    Case("negative rates, periods and coefficients", ["--eval_every", "-1"], "--eval_every -1: must not be negative.",
         script="prime"),
    Case("an output folder that cannot be written", ["--output_dir", "{tmp}/locked/runs"],
         "--output_dir: cannot write in {tmp}/locked (Permission denied); choose a folder you can write to.",
         launcher="no_permission"),
    Case("an output folder that cannot be written", ["--output_dir", "{tmp}/mounted/runs"],
         "--output_dir: cannot write in {tmp}/mounted (Read-only file system); choose a folder you can write to.",
         launcher="read_only"),
]


def launcher(name: str | None, tmp) -> list[str]:
    """The command that starts a case's script: python; torchrun with 2 processes; bubblewrap with {tmp}/locked
    (mode 555) as a user who owns it but has no capabilities, so its mode holds (root ignores it); bubblewrap with
    {tmp}/mounted mounted read-only."""
    if name is None:
        return [sys.executable]
    if name == "torchrun":
        return torchrun()
    assert sandbox.sandbox_unavailable() is None, "CI installs bubblewrap with install.sh as root"
    if name == "no_permission":
        (tmp / "locked").mkdir(mode=0o555)
        if os.geteuid() != 0:
            return [sys.executable]
        return ["bwrap", "--dev-bind", "/", "/", "--unshare-user", "--uid", "1000", "--gid", "1000", "--", sys.executable]
    mounted = str(tmp / "mounted")
    (tmp / "mounted").mkdir()
    user = [] if os.geteuid() == 0 else ["--unshare-user"]
    return ["bwrap", "--dev-bind", "/", "/", *user, "--ro-bind", mounted, mounted, "--", sys.executable]


def base_flags(script, toy, tmp) -> list[str]:
    if script == "eval":
        return []
    return ["--model", str(toy / "model"), "--train_file", str(toy / "train.jsonl"), "--test_file",
            str(toy / "test.jsonl"), "--output_dir", str(tmp), "--run_name", "r", "--sampler", "hf"]


def no_model_is_loaded(monkeypatch) -> None:
    """Loading a model fails the test: every mistake is found before (the README's promise)."""
    from transformers import PreTrainedModel

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was found")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(loaded))
    monkeypatch.setattr(common, "load_model", loaded)
    monkeypatch.setattr(common.Sampler, "__init__", loaded)


@pytest.mark.parametrize("case", CASES + MORE, ids=[c.label for c in CASES] + [f"{c.label} ({c.flags[0]} {c.flags[1]})"
                                                                            for c in MORE])
def test_each_mistake_gets_one_sentence(case, toy, lengths, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub: its retries take ~30 s
    no_model_is_loaded(monkeypatch)
    too_long = min(lengths.train) + 8 - 1  # the shortest prompt plus 8 completion tokens is one too many
    test_too_long = min(lengths.test) + 8 - 1
    values = dict(tmp=tmp_path, toy=toy, all_too_long=too_long, room=too_long - 8, shortest=min(lengths.train),
                  test_too_long=test_too_long, test_room=test_too_long - 8, test_shortest=min(lengths.test))
    for name, text in case.files.items():
        (tmp_path / name).write_text(text)
    if case.folder:
        case.folder(toy, tmp_path)
    start = launcher(case.launcher, tmp_path) if case.subprocess else None
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = base_flags(case.script, toy, tmp_path) + [f.format(**values) for f in case.flags]
    says = case.says.format(**values)
    if case.subprocess:
        proc = subprocess.run([*start, f"{case.script}.py", *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=HANG, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if case.label == "a choice that does not exist":  # the parser's own message, in a box; exit code 2
            text = " ".join(re.sub("[─-╿]", " ", proc.stderr).split())
            assert proc.returncode == 2 and proc.stdout == "" and says in text, proc.stderr[-3000:]
            assert "Traceback" not in proc.stderr
        elif case.launcher == "torchrun":
            # each process says it once; torchrun then reports the failed processes with its own traceback
            assert proc.returncode == 1 and proc.stderr.splitlines().count(says) == 2, proc.stderr[-3000:]
            assert proc.stderr.count("Traceback") == proc.stderr.count("ChildFailedError:") == 1, proc.stderr[-3000:]
        else:
            assert proc.returncode == 1 and proc.stdout == "" and proc.stderr == says + "\n", proc.stderr[-3000:]
    else:
        with pytest.raises(SystemExit) as stop:
            if case.script == "eval":
                ev.main(argv)
            else:
                monkeypatch.setattr(sys, "argv", [f"{case.script}.py", *argv])
                MODULES[case.script].main()
        assert str(stop.value) == says
        assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing was created


def test_the_sentence_and_its_newline_are_one_write(monkeypatch):
    """Processes sharing a pipe (torchrun's) interleave what they write: the entry point writes the sentence
    and its newline in one piece (the interpreter writes them apart), and exits with code 1."""
    writes, stopped = [], []

    class Spy:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    def main():
        raise SystemExit("--flag 3: one sentence.")

    monkeypatch.setattr(sys, "stderr", Spy())
    monkeypatch.setattr(common, "stop_children", lambda: stopped.append(True))
    with pytest.raises(SystemExit) as stop:
        common.run_main(main)
    assert (stop.value.code, writes, stopped) == (1, ["--flag 3: one sentence.\n"], [True])
    with pytest.raises(SystemExit) as stop:  # an exit code passes through as it is
        common.run_main(lambda: sys.exit(3))
    assert (stop.value.code, writes[1:]) == (3, [])


def test_prompts_too_long_are_dropped_with_one_warning_line(toy, lengths, tmp_path, capsys):
    """Rows whose prompt and --max_completion_length tokens do not fit the context are dropped when the data is
    loaded, in training and in eval.py, with one line: how many, and the limit."""
    rows = common.load_tasks(toy / "test.jsonl")[:4]
    long_row = {**rows[0], "id": "long", "prompt": [{"role": "user", "content": "7 " * 1000}]}
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], long_row, *rows[1:]]))
    args = common.parse_args(grpo_logprob.Args, [*base_flags("grpo_logprob", toy, tmp_path), "--train_file", str(data),
                                                 "--test_file", str(data)])
    _, train, test = common.check_run(args, SimpleNamespace(num_processes=1, is_main_process=True))
    assert [r["id"] for r in train] == [r["id"] for r in test] == [r["id"] for r in rows]
    room = lengths.context - args.max_completion_length
    warning = (f"warning: {data}: dropped 1 of 5 prompts longer than {room} tokens (the context of {lengths.context} "
               f"tokens minus --max_completion_length {args.max_completion_length}).")
    assert capsys.readouterr().out.splitlines() == [warning, warning]  # the train file, then the test file
    assert not (tmp_path / "r").exists()
    # eval.py: the same rows, the same line (with its own flag)
    tokenizer, context = common.load_tokenizer(str(toy / "model"))
    kept = common.fit_context(ev.load_dataset_rows(str(data), None, 0), tokenizer, context, 64, str(data), "--max_tokens")
    assert [r["id"] for r in kept] == [r["id"] for r in rows]
    assert capsys.readouterr().out.strip() == warning.replace("--max_completion_length", "--max_tokens")


def test_known_tasks_are_what_data_prep_writes():
    import data_prep

    # apps and taco rows are written as task "code"
    assert set(common.KNOWN_TASKS) == (set(data_prep.TASKS) - {"apps", "taco"}) | {"toy", "code"}


def test_a_failed_start_does_not_block_the_corrected_one(toy, tmp_path):
    """A start that fails late (after the run folder exists, e.g. the code sandbox cannot start) leaves a
    folder without a logged step: the same command, corrected, starts there without --resume."""
    (tmp_path / "r" / "eval").mkdir(parents=True)
    (tmp_path / "r" / "config.json").write_text(json.dumps(config(toy, tmp_path)))
    args = common.parse_args(grpo_logprob.Args, base_flags("grpo_logprob", toy, tmp_path))
    _, train, _ = common.check_run(args, SimpleNamespace(num_processes=1, is_main_process=True))
    assert train


def test_the_readme_table_has_a_case_per_row():
    """README "What you did -> what it says": each row's first column is a case above, and each case a row."""
    section = (REPO / "README.md").read_text().split("### What you did -> what it says\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), section[start:]))
    labels = [line.split("|")[1].strip().replace("`", "") for line in table[2:]]
    assert labels == [c.label for c in CASES]
    assert {c.label for c in MORE} <= set(labels)
    # each row's sentence is the case's: paths and numbers aside (the README shows examples), "..." elides
    for line, case in zip(table[2:], CASES):
        shown = re.match(r"`([^`]*)`", line.split("|", 2)[2].strip())
        if shown:  # rows that say "the same sentence ..." in words have no sentence of their own
            pattern = re.escape(sentence_shape(shown[1])).replace(re.escape("..."), ".*")
            assert re.fullmatch(pattern, sentence_shape(case.says)), f"README row {case.label!r}: {shown[1]}"


def sentence_shape(text: str) -> str:
    """A sentence with its paths written P and its numbers N: what the README row and the case share."""
    text = re.sub(r"\{(tmp|toy)\}", "/P", text.replace("`", ""))
    text = re.sub(r"\{[a-z_]+\}", "0", text)  # the case's other placeholders are numbers
    text = re.sub(r"[^\s(]*/[^\s);,:]*", "P", text)
    return " ".join(re.sub(r"\d+", "N", text).split())
