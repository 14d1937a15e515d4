"""The shared chat client's parts that need no server: the key rule, redaction and the reply cache.

The client against a real loopback server is tested through its two users, in test_chat_writer.py and
tests/metrics/test_metrics_judges.py.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from datamodules.chat import ChatClient, ChatError, ReplyCache, api_key_from_env, redact, request_key
from datamodules.writers import ChatWriter, ChatWriterError
from metrics.judges import ChatJudge, ChatJudgeError

URL = "http://127.0.0.1:9/v1"  # never contacted: nothing here sends a request


def test_redact_replaces_every_occurrence_of_the_key() -> None:
    assert redact("sk-abc and sk-abc again", "sk-abc") == "*** and *** again"
    assert redact("nothing to hide", None) == "nothing to hide"


def test_key_rule_is_the_same_for_client_writer_and_judge(monkeypatch) -> None:
    monkeypatch.delenv("UNSET_KEY_VAR", raising=False)
    monkeypatch.setenv("EMPTY_KEY_VAR", "")
    assert api_key_from_env(None) is None
    for name in ("UNSET_KEY_VAR", "EMPTY_KEY_VAR"):
        message = re.escape(f"the environment variable {name} (the API key) is not set")
        with pytest.raises(ChatError, match=message):
            ChatClient(URL, "m", name)
        with pytest.raises(ChatWriterError, match=message):
            ChatWriter(URL, "m", name)
        with pytest.raises(ChatJudgeError, match=message):
            ChatJudge(URL, "m", api_key_env=name)
    monkeypatch.setenv("SET_KEY_VAR", "sk-xyz")
    client = ChatClient(URL, "m", "SET_KEY_VAR")
    assert "sk-xyz" not in repr(client) and client.redact("key sk-xyz") == "key ***"


def test_writer_and_judge_share_one_client_and_one_cache_class(tmp_path: Path) -> None:
    writer = ChatWriter(URL, "m", cache_path=tmp_path / "w.jsonl")
    judge = ChatJudge(URL, "m", cache_path=tmp_path / "j.jsonl")
    assert type(writer.client) is type(judge.client) is ChatClient
    assert type(writer.client.cache) is type(judge.client.cache) is ReplyCache


def test_request_key_covers_model_messages_and_settings() -> None:
    messages = [{"role": "user", "content": "q"}]
    keys = {request_key(ChatClient(URL, model, temperature=t, max_tokens=n).body(messages))
            for model, t, n in [("m", 1.0, None), ("m2", 1.0, None), ("m", 0.0, None), ("m", 1.0, 4)]}
    assert len(keys) == 4


def test_reply_cache_lines_stay_whole_under_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    caches = [ReplyCache(path), ReplyCache(path)]  # two writers of one file, e.g. two runs
    long_reply = "x" * 20000

    def put(n: int) -> None:
        for i in range(50):
            caches[n % 2].put(f"{n}-{i}", f"{long_reply} {n} {i}")

    threads = [threading.Thread(target=put, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 400 and all(json.loads(line)["reply"].startswith(long_reply) for line in lines)
    with path.open("a") as handle:  # an interrupted append: the torn line is cut when the file is opened
        handle.write('{"key": "torn", "rep')
    again = ReplyCache(path)
    assert len(again) == 400 and again.get("3-7") == f"{long_reply} 3 7"
    assert path.read_text().endswith("}\n")
    memory = ReplyCache()  # no path: in memory only
    memory.put("k", "v")
    assert memory.get("k") == "v" and memory.path is None


SECRET = "sk-proj-Zq81secretKEY0123456789"


@pytest.mark.parametrize("make", [
    lambda **kw: ChatClient(model="m", **kw),
    lambda **kw: ChatWriter(model="m", **kw),
    lambda **kw: ChatJudge(model="m", **kw),
])
def test_a_key_given_for_its_variable_name_is_refused_and_never_echoed(make) -> None:
    with pytest.raises(ChatError) as raised:
        make(base_url="http://127.0.0.1:9/v1", api_key_env=SECRET)
    assert SECRET not in str(raised.value) and "sk-" not in str(raised.value)
    assert "not an environment variable name" in str(raised.value)


@pytest.mark.parametrize("url", [f"http://user:{SECRET}@127.0.0.1:9/v1", f"https://{SECRET}@api.example/v1"])
def test_credentials_in_the_url_are_refused_and_never_echoed(url) -> None:
    for make in (ChatClient, ChatWriter, ChatJudge):
        with pytest.raises(ChatError) as raised:
            make(base_url=url, model="m")
        message = str(raised.value)
        assert SECRET not in message and "base_url: the URL carries credentials" in message


def test_a_key_in_a_judge_setting_of_main_py_is_never_printed_nor_saved(tmp_path, cli_args, capfd) -> None:
    """From the command line: exit 2, one line, and the key neither on the terminal nor in a file."""
    from main import main

    out = tmp_path / "run"
    for setting in (f"--model.init_args.judge.init_args.api_key_env={SECRET}",
                    f"--model.init_args.judge.init_args.base_url=http://u:{SECRET}@127.0.0.1:9/v1"):
        args = cli_args("test", out, extra=["--model.init_args.judge=metrics.judges.ChatJudge",
                                            "--model.init_args.judge.init_args.base_url=http://127.0.0.1:9/v1",
                                            "--model.init_args.judge.init_args.model=judge", setting])
        assert main(args) == 2
        captured = capfd.readouterr()
        assert SECRET not in captured.out + captured.err
        assert captured.err.strip().splitlines()[-1].startswith("error: ")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if SECRET in p.read_text(errors="replace")]
