"""`rlhf chat`: talk to a trained actor (not a DVC stage)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from stages.common import fail, guarded


def chat(
    model: Path = typer.Option(Path("models/ppo/actor"), help="HF model folder of an actor"),
    prompt: str | None = typer.Option(None, help="answer this one message and exit (for scripts)"),
    temperature: float = typer.Option(0.7, help="sampling temperature"),
    top_p: float = typer.Option(0.9, help="nucleus sampling"),
    top_k: int = typer.Option(0, help="sample among the k likeliest tokens (0 = off)"),
    max_new_tokens: int = typer.Option(64, help="longest answer"),
    greedy: bool = typer.Option(False, help="greedy decoding instead of sampling"),
    seed: int | None = typer.Option(None, help="seed the sampler"),
    engine: str = typer.Option("generate", help="who draws the answers: generate (transformers) or vllm (`make vllm`)"),
) -> None:
    """Multi-turn chat with streaming; type `clear` to forget the conversation, `quit` (or Ctrl-D) to leave."""
    from rlhf.evaluation.chat import Chat

    checks = [  # every option up front, before a model loads
        (max_new_tokens >= 1, f"--max-new-tokens {max_new_tokens}: must be at least 1"),
        (greedy or temperature > 0, f"--temperature {temperature}: must be > 0 (for greedy decoding pass --greedy)"),
        (0 < top_p <= 1, f"--top-p {top_p}: must be in (0, 1] (1 = off)"),
        (top_k >= 0, f"--top-k {top_k}: must be >= 0 (0 = off)"),
        (engine in ("generate", "vllm"), f"--engine {engine}: must be generate or vllm"),
    ]
    for ok, problem in checks:
        if not ok:
            fail(problem)
    session = guarded(Chat, model, temperature, top_p, max_new_tokens, not greedy, seed, top_k, engine=engine)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if prompt is not None:
        session.reply(prompt, on_text=stream)
        sys.stdout.write("\n")
        return
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"chatting with {model} (`clear` forgets, `quit` leaves)")
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            break
        message = line.strip()
        if not message:
            continue
        if message == "clear":
            session.clear()
            typer.echo("(conversation cleared)")
            continue
        sys.stdout.write("bot> ")
        session.reply(message, on_text=stream)
        sys.stdout.write("\n")
        sys.stdout.flush()
