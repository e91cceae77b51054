"""LoRA adapters on the plain blocks: which linears get them, PEFT's injection, and merging in state dicts.

Owns what ``model.lora`` means (:class:`lvita.config.schema.LoraConfig`). It is applied from outside the
model, as the attention function and the memory levers are: the blocks know nothing of it, and
:func:`add_adapters` wraps their ``nn.Linear`` modules with PEFT's ``lora.Linear`` in place, block by block,
so a pipeline rank builds adapters only for the blocks it owns (the ZeRO engine's plain model, all of them).

- Targets are named per module group (``vision`` / ``projector`` / ``llm``,
  :func:`lvita.model.longvita.module_of`): a linear is adapted when its name ends with ``.<target>``
  (``q_proj``; ``mlp.0`` for the released projector) or the target is ``all``. The LM head is never
  adapted (the loss reads its weight directly). :func:`check_targets` names the valid targets.
- Initial adapters are seeded per block (``seed``, block index): every layout starts from the same
  adapters, as the blocks themselves are seeded (:func:`lvita.model.longvita.build_blocks`). PEFT's own
  initialisation: ``lora_A`` Kaiming-uniform, ``lora_B`` zero, so the adapted model starts equal to the base.
- Parameter names are PEFT's: ``q_proj.weight`` becomes ``q_proj.base_layer.weight`` plus
  ``q_proj.lora_A.default.weight`` (rank x in) and ``q_proj.lora_B.default.weight`` (out x rank). A
  checkpoint's per-block files keep those names (DeepSpeed resumes them as they are);
  :func:`merged` turns such a state dict into plain names with ``W + alpha / rank * B @ A`` (what every
  reader of weights sees: init_from, export, generate, eval), :func:`adapter_state` takes the adapters
  alone and :func:`base_state` the base weights alone (the adapter-only export and its base).

    from lvita.model.lora import add_adapters
    add_adapters({i: block for i, block in enumerate(blocks)}, cfg.model.lora, seed=42)

Trade-off: PEFT's layer, not our own: its ``lora.Linear`` is what users' adapters and PEFT's loaders expect,
and its forward (``base(x) + B(A(dropout(x))) * scaling``) is checked against a hand computation
(tests/test_lora.py). Dropout draws from the global RNG, so layouts agree only at ``dropout: 0``.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from lvita.errors import ConfigError
from lvita.model.longvita import module_of

ADAPTER = "default"  # PEFT's adapter name; the one adapter lvita trains
# a decoder layer's projections (model.lora.llm's default targets): leaf name -> path in the layer
LLM_LINEARS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
               "down_proj": "mlp.down_proj"}
HEAD = "lm_head"  # never adapted


def is_adapter(name: str) -> bool:
    """A LoRA parameter (``...lora_A.default.weight`` / ``...lora_B.default.weight``)?"""
    return ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B."))


def scaling(lora) -> float:
    """PEFT's multiplier of the adapters' output: alpha / rank (``lora``: model.lora, or a manifest's dict of it)."""
    alpha, rank = (lora["alpha"], lora["rank"]) if isinstance(lora, dict) else (lora.alpha, lora.rank)
    return float(alpha) / int(rank)


def _linears(block: nn.Module) -> list[tuple[str, str]]:
    """(name in the block, module group) of every plain ``nn.Linear`` of ``block`` but the LM head."""
    return [(n, module_of(n)) for n, m in block.named_modules()
            if type(m) is nn.Linear and n.rsplit(".", 1)[-1] != HEAD]


def _targets(lora) -> dict[str, list[str]]:
    return {"vision": list(lora.vision), "projector": list(lora.projector), "llm": list(lora.llm)}


def _matches(name: str, group: str, targets: dict[str, list[str]]) -> bool:
    return any(t == "all" or name == t or name.endswith("." + t) for t in targets.get(group, []))


def adapts(name: str, group: str, lora) -> bool:
    """Does ``model.lora`` adapt the linear ``name`` (a path ending in its leaf: ``mlp.gate_proj``) of ``group``?"""
    return lora is not None and _matches(name, group, _targets(lora))


def adapted_groups(lora) -> list[str]:
    """The module groups with at least one target (None: no LoRA)."""
    return [] if lora is None else [g for g, ts in _targets(lora).items() if ts]


def check_targets(blocks: "dict[int, nn.Module] | list[nn.Module]", lora) -> dict[str, int]:
    """Every target of ``lora`` names a linear of its group in ``blocks`` (meta-device blocks will do);
    raises ConfigError naming the valid ones. Returns the adapted linears per group."""
    blocks = dict(enumerate(blocks)) if isinstance(blocks, list) else blocks
    found: dict[str, set[str]] = {"vision": set(), "projector": set(), "llm": set()}
    counts = {g: 0 for g in found}
    targets = _targets(lora)
    for block in blocks.values():
        for name, group in _linears(block):
            found[group].add(name)
            counts[group] += _matches(name, group, targets)
    for group, wanted in targets.items():
        for t in wanted:
            if t != "all" and not any(n == t or n.endswith("." + t) for n in found[group]):
                valid = sorted({_short(n, group) for n in found[group]})
                raise ConfigError(f"model.lora.{group}: no linear layer of the {group} is called {t!r}; valid: "
                                  f"{', '.join(valid) or 'none'}, or \"all\"")
    return counts


def _short(name: str, group: str) -> str:
    """The name a target uses: the leaf (``q_proj``), or within the projector its path (``mlp.0``)."""
    if group == "projector":
        return name.split("multi_modal_projector.", 1)[-1]
    return name.rsplit(".", 1)[-1]


def add_adapters(blocks: dict[int, nn.Module], lora, seed: int) -> int:
    """Wrap the targeted linears of each block (``{block index: module}``) with PEFT's LoRA layer, in place;
    block ``b``'s adapters are drawn after ``torch.manual_seed(seed + 7919 * (b + 1))``, the caller's RNG state
    is kept. Returns the number of adapted linears. Nothing happens when ``lora`` is None."""
    if lora is None:
        return 0
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets, n = _targets(lora), 0
    with torch.random.fork_rng(devices=[]):
        for b, block in sorted(blocks.items()):
            names = [name for name, group in _linears(block) if _matches(name, group, targets)]
            if not names:
                continue
            torch.manual_seed(seed + 7919 * (b + 1))
            config = PeftLoraConfig(r=int(lora.rank), lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
                                    target_modules="|".join(re.escape(x) for x in names), bias="none")
            inject_adapter_in_model(config, block, adapter_name=ADAPTER)
            n += len(names)
    return n


def trains(name: str, trainable: list[str], lora) -> bool:
    """Does parameter ``name`` train: an adapter, or a parameter of a fully trained module (``model.trainable``)."""
    return (lora is not None and is_adapter(name)) or (module_of(name) in trainable and ".base_layer." not in name)


# -- state dicts ----------------------------------------------------------------------------------------

_A = re.compile(rf"^(?P<module>.*?)\.?lora_A\.{ADAPTER}\.weight$")


def has_adapters(state: dict) -> bool:
    return any(is_adapter(k) for k in state)


def merged(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict with PEFT's LoRA names -> plain names, every adapted weight ``W + scale * B @ A``
    (computed in fp32, stored in W's dtype). A state dict without adapters comes back unchanged."""
    if not has_adapters(state):
        return state
    out = base_state(state)
    for w_key, (a, b) in adapter_state(state).items():
        w = out[w_key]
        out[w_key] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with PEFT's LoRA names -> plain names with the adapters left out (the base weights as they
    are: what an adapter export applies to)."""
    return {key.replace(".base_layer.", ".").removeprefix("base_layer."): value
            for key, value in state.items() if not is_adapter(key)}


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{plain weight name of an adapted linear (``...q_proj.weight``): (lora_A (rank, in), lora_B (out, rank))}."""
    out = {}
    for key in state:
        m = _A.match(key)
        if m:
            prefix = f"{m.group('module')}." if m.group("module") else ""
            out[f"{prefix}weight"] = (state[key], state[f"{prefix}lora_B.{ADAPTER}.weight"])
    return out
