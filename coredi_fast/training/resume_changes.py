"""What a resumed run may change: the settings given on resume take effect and are reported; the ones that would make
it another run (another model, data shape, feature channels) are refused by name.

The checkpoint stores the config it was trained with. On resume the two are compared field by field:
  * fixed fields (FIXED_ON_RESUME) that differ: `RunSetupError` listing each with both values;
  * any other difference: applied and reported (`resume: optim.lr 0.0001 -> 0.5`). The optimizer's hyper-parameters
    are the delicate case: `optimizer.load_state_dict` restores the saved lr, betas, eps and weight decay of every
    group, which silently undid an `optim.lr=...` given on resume; `keep_configured_hyperparameters` puts the
    configured ones back after the state is loaded (the moments and step counts stay as saved).
"""
from __future__ import annotations

from .run_folder import RunSetupError

# Changing one of these makes the checkpoint another model or another data stream (prefix match on dotted names).
FIXED_ON_RESUME = (
    "data.source", "data.image_size", "data.channels", "data.global_batch_size",
    "model.name", "model.learn_sigma", "model.overrides",
    "encoder.name", "encoder.resolution",
    "method.projector.mode", "method.projector.feature_dim", "method.projector.dim", "method.projector.norm",
    "method.prediction", "run.seed",
)
# Fields that say how this invocation runs, not what is trained: never reported.
NOT_REPORTED = ("run.resume", "run.overwrite", "model.init_from", "model.init_weights")  # these two: fresh runs only
HYPERPARAMETERS = ("lr", "base_lr", "betas", "eps", "weight_decay")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "overrides":
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: dict, current: dict) -> list:
    """[(field, saved value, current value)] for every field that differs, in the current config's order."""
    old, new = _flatten(saved or {}), _flatten(current)
    changes = []
    for name, value in new.items():
        if name in NOT_REPORTED or name not in old:
            continue
        before = old[name]
        if isinstance(before, (list, tuple)) and isinstance(value, (list, tuple)):
            same = list(before) == list(value)
        else:
            same = before == value
        if not same:
            changes.append((name, before, value))
    return changes


def check_resume_changes(saved: dict, current: dict, checkpoint) -> list:
    """The allowed changes (to report); RunSetupError naming every fixed field that differs."""
    changes = config_changes(saved, current)
    fixed = [(n, a, b) for n, a, b in changes if any(n == f or n.startswith(f + ".") for f in FIXED_ON_RESUME)]
    if fixed:
        listed = "; ".join(f"{n}: {a!r} in the checkpoint, {b!r} now" for n, a, b in fixed)
        raise RunSetupError(f"cannot resume {checkpoint} with a different {', '.join(n for n, _, _ in fixed)} "
                            f"({listed}). Resume with the checkpoint's values, or start a new run (another "
                            f"run.out_dir, or run.resume=none run.overwrite=true)")
    return [c for c in changes if c not in fixed]


def configured_hyperparameters(optimizer) -> list:
    """Each param group's hyper-parameters as the current config set them (call before loading a state)."""
    return [{k: group[k] for k in HYPERPARAMETERS if k in group} for group in optimizer.param_groups]


def keep_configured_hyperparameters(optimizer, configured: list) -> None:
    """Put the configured hyper-parameters back after `optimizer.load_state_dict` replaced them with the saved ones."""
    if len(configured) != len(optimizer.param_groups):
        raise RunSetupError(f"the checkpoint's optimizer has {len(optimizer.param_groups)} parameter groups, this "
                            f"run builds {len(configured)}")
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
