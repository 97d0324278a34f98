"""The `check` stage: all of params.yaml validated, and what it names looked up, before any stage runs.

DVC removes a stage's outputs before it runs the stage's command, so a mistake that the stage itself reports (a
typo in sft.*) used to cost the last good models/sft, and the metrics and curves that are not in DVC's cache. Every
stage of dvc.yaml depends on this stage's output, so `dvc repro` runs it first and stops here, with every earlier
output as it was. Its output is the same bytes whenever the params are valid, so a passing check never makes a
later stage stale: only that stage's own params and deps do.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.config import Params, check_loggers

OK = "params.yaml passed `rlhf check`; this file does not change while it keeps passing\n"


def run_check(params: Params, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Raise one UserError at the first problem; return what was checked, for the stage's log line."""
    from rlhf.data.prepare import check_sources_tracked
    from rlhf.data.sources import locate_source
    from rlhf.errors import UserError
    from rlhf.pipeline.guards import check_model_folder
    from rlhf.rl.rewards import import_object, load_functions
    from rlhf.training.runtime import resolve_device

    done = ["every params group"]
    sources = [*params.data.sources, *([params.data.ptx_source] if params.data.ptx_source else [])]
    for src in sources:
        if src.path != "builtin":
            locate_source(src)  # a missing local file fails here; a hub id is only read by prepare
    check_sources_tracked(sources, dvc_yaml)
    done.append(f"{len(sources)} data source(s)")
    load_functions(params.rewards.functions, "rewards.functions")
    load_functions(params.evaluate.scorers or [], "evaluate.scorers")
    if params.ppo.trainer:
        import_object(params.ppo.trainer, "ppo.trainer")
    env = params.ppo.environment
    if env.name:
        from rlhf.rollout.environments.base import load_environment

        load_environment(env.name, env.options, env.tool_timeout_s)
    done.append("reward functions, environment and trainer imports")
    for key in ("model", "reward_model"):
        name = getattr(params, key).name_or_path
        if name and not str(name).startswith("models/base"):  # models/base is written by the base_model stage
            check_model_folder(name, None, f"{key}.name_or_path")
    check_loggers(params.logging.report_to)
    resolve_device(params.engine)
    if params.engine.hostfile and not Path(params.engine.hostfile).is_file():
        raise UserError(f"engine.hostfile '{params.engine.hostfile}' does not exist: give a DeepSpeed hostfile or "
                        "clear it")
    done.append("models, device and hostfile")
    return done
