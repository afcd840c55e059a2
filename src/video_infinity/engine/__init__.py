"""The engine kit: model-agnostic pieces that each family's engine plan (``families/<f>/engine.py``)
puts on its model. The core imports no family.

* :mod:`.handle`: what was attached (hooks, processors) and ``remove()``;
* :mod:`.comm`: the collectives: halo exchange (point-to-point), gathers and broadcasts;
* :mod:`.attention`: dual-scope attention (pure math) and the temporal attention processor;
* :mod:`.per_frame`: per-frame computation (a frame's arithmetic fixed by the frame alone);
* :mod:`.frame_conv`: temporal convolution tap by tap; :mod:`.norm`: whole-video GroupNorm;
* :mod:`.common`: hooks shared by UNet-style families (call bookkeeping, whole-video norm, 1x1 convs).

``video_infinity.parallelize`` (:mod:`video_infinity.parallel`) asks the family registry which plan applies.
"""

from __future__ import annotations

from .handle import ParallelHandle, is_parallelized

__all__ = ["ParallelHandle", "is_parallelized"]
