"""What ``parallelize`` attached to a model, so that ``remove()`` can take it off again."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import Attention
from torch import nn

from ..config import EngineConfig
from ..context import ClipContext, DenoiseState

HOOK_NAME = "video_infinity"
"""The name of every hook the engine registers (one per module)."""


def is_parallelized(model: nn.Module) -> bool:
    return HookRegistry.check_if_exists_or_initialize(model).get_hook(HOOK_NAME) is not None


@dataclass
class ParallelHandle:
    """What ``parallelize`` changed; ``remove()`` undoes it."""

    unet: nn.Module
    config: EngineConfig
    context: ClipContext
    state: DenoiseState
    hooked: list[nn.Module] = field(default_factory=list)
    processors: list[tuple[Attention, object]] = field(default_factory=list)
    active: bool = True

    def hook(self, module: nn.Module, model_hook: ModelHook) -> None:
        """Register ``model_hook`` on ``module`` under the engine's name, innermost; ``remove()`` takes it off.

        Innermost: many engine hooks compute in place of the module's forward (per-frame products on
        its weights, chunked blocks) instead of calling it, so hooks that were there before (diffusers'
        group offloading loads a module's weights in its pre-forward) must run around them, as they
        would around the module's own forward. Those hooks are taken off and registered again, in their
        order, after the engine's."""
        registry = HookRegistry.check_if_exists_or_initialize(module)
        others = [(name, registry.hooks[name]) for name in registry._hook_order]
        for name, _ in reversed(others):
            registry.remove_hook(name, recurse=False)
        registry.register_hook(model_hook, HOOK_NAME)
        for name, other in others:
            registry.register_hook(other, name)
        self.hooked.append(module)

    def set_processor(self, attn: Attention, processor: object) -> None:
        """Give ``attn`` a new attention processor; ``remove()`` restores the current one."""
        self.processors.append((attn, attn.processor))
        attn.set_processor(processor)

    def set_step(self, index: int) -> None:
        """The denoising step about to run (0: the schedule's first): every rank's sampling loop calls
        it before the step's model calls, so that what depends on the step (rotating global frames,
        ``attn.global_frames``) is the same on every rank and after a resume."""
        self.state.step, self.state.step_given = int(index), True

    def remove(self) -> None:
        """Restore the model's original behaviour (hooks off, original attention processors back)."""
        if not self.active:
            return
        for module in self.hooked:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME, recurse=False)
        for attn, processor in self.processors:
            attn.set_processor(processor)
        self.hooked.clear()
        self.processors.clear()
        self.active = False
