"""chat.py: sampling settings generate() would reject are refused before the model loads, and any error
inside generation ends the chat with its one-line reason (it used to hang the streaming loop forever)."""

import io
import re
import threading

import pytest

from dist_glm import cli
from dist_glm.tools.chat import ChatArgs, ChatSession, check_sampling


@pytest.mark.parametrize(
    "settings,match",
    [
        (
            {"do_sample": True, "temperature": 0.0},
            r"must be positive when sampling; .*--do_sample=false",
        ),
        ({"temperature": 0.0}, r"temperature=0.0 must be positive"),  # do_sample from the model's config
        ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, r"max_new_tokens=0 must be at least 1"),
    ],
)
def test_bad_sampling_settings_are_refused(settings, match):
    problems = check_sampling(ChatArgs(**settings))
    assert len(problems) == 1 and re.search(match, problems[0]), problems


def test_greedy_with_temperature_zero_is_allowed():
    assert check_sampling(ChatArgs(do_sample=False, temperature=0.0)) == []


def test_temperature_zero_exits_2_before_loading(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.chat_main(["--model_name_or_path=/no/such/model", "--do_sample", "--temperature=0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("chat.py: error: temperature=0.0")


def test_a_generation_error_ends_the_chat_with_its_reason(pretrained_tiny, monkeypatch, capsys):
    original_init = ChatSession.__init__

    def init_with_broken_generate(self, *args, **kwargs):
        original_init(self, *args, **kwargs)

        def generate(**_):
            raise ValueError("boom")

        self.model.generate = generate

    monkeypatch.setattr(ChatSession, "__init__", init_with_broken_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    outcome = {}

    def chat():
        try:
            cli.chat_main([f"--model_name_or_path={pretrained_tiny}", "--max_new_tokens=4"])
        except SystemExit as e:
            outcome["code"] = e.code

    worker = threading.Thread(target=chat, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "chat hung after a generation error"
    assert outcome.get("code") == 2
    assert "chat.py: error: generation failed: ValueError: boom" in capsys.readouterr().err


def test_a_thinking_reply_shows_its_thought_apart_from_the_answer():
    from dist_glm.tools.chat import show_thinking

    pieces = ["<think>", "先想", "一下", "</think>", "答案"]  # <think> and </think> are single tokens
    assert "".join(map(show_thinking, pieces)) == "[thinking] 先想一下\n[answer] 答案"
    assert show_thinking("<think></think>\n答案") == "\n答案"  # an empty thought is not shown
    assert show_thinking("GLM-4 的回答") == "GLM-4 的回答"
