"""How each model family is sampled by its authors: the defaults `sample.py` takes from the checkpoint.

    sit   SiT / DiT / REPA / ReDi (willisma/SiT sample.py, zelaki/ReDi sample_ddp.py): the SDE, Euler-Maruyama with
          SiT's "Mean" last step, 250 steps; no guidance interval.
    jit   JiT (LTH14/JiT main_jit.py defaults, README evaluation commands): the ODE with Heun, 50 steps (the last
          one Euler), guidance only for 0.1 < t < 1 by JiT's open-interval rule (every published JiT command passes
          --interval_min 0.1 --interval_max 1.0; the guidance scale itself depends on the model size, 2.2 to 3.0,
          so it stays a flag).

The family is read off the checkpoint (our checkpoints' model name; public checkpoints are SiT-family, named by
--model). A flag given on the command line always wins; `apply_recipe` says where each setting came from.
"""
from __future__ import annotations

SAMPLING_RECIPES: dict[str, dict] = {
    "sit": {"sampler": "sde", "method": "heun", "steps": 250, "guidance_interval": None,
            "guidance_interval_rule": "closed"},
    "jit": {"sampler": "ode", "method": "heun", "steps": 50, "guidance_interval": (0.1, 1.0),
            "guidance_interval_rule": "jit"},
}
_NAMES = {"sit": "SiT", "jit": "JiT"}
_FLAGS = {"sampler": "--sampler", "method": "--method", "steps": "--steps", "guidance_interval": "--guidance-interval",
          "guidance_interval_rule": "--guidance-interval-rule"}


def apply_recipe(args, family: str, where: str) -> list[str]:
    """Fill every sampler setting of `args` left at None with the `family` recipe, in place. Returns one line per
    setting, "name=value (source)": the flag that set it, or "<family> recipe: <where>" (e.g. where = "the
    checkpoint's model JiT-B/16")."""
    if family not in SAMPLING_RECIPES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(SAMPLING_RECIPES)}")
    lines = []
    for key, value in SAMPLING_RECIPES[family].items():
        given = getattr(args, key)
        if given is None:
            setattr(args, key, value)
            source = f"{_NAMES[family]} recipe: {where}"
        else:
            source = _FLAGS[key]
        shown = getattr(args, key)
        shown = "none" if shown is None else " ".join(f"{v:g}" for v in shown) if isinstance(shown, (list, tuple)) \
            else shown
        lines.append(f"{key}={shown} ({source})")
    return lines
