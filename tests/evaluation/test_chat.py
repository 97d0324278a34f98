"""`rlhf chat`: one-shot answers for scripts, an interactive session over piped stdin, and the Python API."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli


def test_chat_prompt_answers_once(trained: Path) -> None:
    proc = run_cli("chat", "--model", "models/sft", "--prompt", "Sort ascending: 3 1 2", "--max-new-tokens", "8",
                   "--seed", "0", cwd=trained)
    assert proc.stdout.strip() and "you>" not in proc.stdout


def test_chat_interactive_over_piped_stdin(trained: Path) -> None:
    proc = run_cli("chat", "--model", "models/sft", "--max-new-tokens", "6", "--seed", "0", cwd=trained,
                   stdin="Sort ascending: 3 1 2\nclear\nSort ascending: 9 4\nquit\nnever read\n")
    assert proc.stdout.count("bot> ") == 2 and "(conversation cleared)" in proc.stdout


def test_chat_api_keeps_and_clears_history(trained: Path) -> None:
    from rlhf.evaluation.chat import Chat

    chat = Chat(trained / "models/sft", max_new_tokens=6, seed=0)
    pieces: list[str] = []
    first = chat.reply("Sort ascending: 3 1 2", on_text=pieces.append)
    assert "".join(pieces).strip() == first
    chat.reply("Sort ascending: 7 5")
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    chat.clear()
    assert chat.history == []


def test_chat_on_a_missing_model_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("chat", "--model", str(tmp_path / "nope"), "--prompt", "hi", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
