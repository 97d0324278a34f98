"""`rlhf serve-reward`: a reward function behind an HTTP URL (not a DVC stage), for a grader that must run in
another process or on another machine; step 3 calls it with `rewards.functions: [{url: ...}]`."""

from __future__ import annotations

import typer

from stages.common import fail, guarded


def serve_reward(
    function: str = typer.Option(..., help="the reward function, module:function with TRL's signature"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000, help="port to listen on (0: any free port, printed)"),
) -> None:
    """Answer each POST of prompts and completions (OpenRLHF's remote reward convention) with {"rewards": [...]}
    from the function, until interrupted."""
    from rlhf.config import RewardFunctionConfig
    from rlhf.rl.remote import reward_server
    from rlhf.rl.rewards import load_functions

    if not 0 <= port < 65536:
        fail(f"--port {port}: must be in 0..65535 (0: any free port)")
    try:
        config = RewardFunctionConfig(function=function)
    except ValueError:
        fail(f"--function '{function}': must be module:function (for example rewards.my_checks:exact_answer)")
    f = guarded(load_functions, [config], "--function")[0]

    def score(prompts: list, completions: list, columns: list[dict]) -> list:
        return f(prompts, completions, [[] for _ in completions], columns)

    try:
        server = reward_server(score, host, port)
    except OSError as err:
        fail(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port")
    typer.echo(f"serving {function} on http://{host}:{server.server_address[1]}/ (Ctrl-C stops)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
