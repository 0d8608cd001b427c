"""The denoising step captured whole in a CUDA graph and replayed: `NucleusPipeline(..., cuda_graph=True)`,
`nucleus generate --cuda-graph`.

After text encoding every step of a generation runs the same kernels on the same shapes (static MoE shapes, text
K/V computed once per call), so the step (denoise.py) can be recorded once and replayed: one launch instead of
thousands, which is what remains between a compiled step and the arithmetic floor on the released model. The
transformer's forward has no host sync, which capture needs.

- The first `warmup` steps of a new shape run eagerly on a side stream (they are real steps of the generation, not
  thrown away: allocator and cuBLAS settle), the next one is captured, and it and every later step replay.
- Graphs are kept across calls, one per call shape (batch rows, image tokens, text length, mask, guidance scale,
  dtype), the least recently used dropped beyond `capacity`: a server sees a few batch sizes, a job one or two.
  Each graph holds its own memory pool (about one step's activations) and static copies of its inputs.
- A graph replays the transformer's modules as they were when captured: the pipeline drops its graphs whenever it
  changes them (load_lora, merge_lora, enable_fp8_compute, to).

Not with a step cache (a cached step's work changes from step to step) and only on CUDA devices (checked).

    graphs = StepGraphs()
    step = graphs.step(transformer, text_kv, img_shapes, guidance_scale, latents)
    for i in range(steps):
        latents = step(latents, t_N[i].expand(rows), sigmas[i], sigmas[i + 1])
    latents = latents.clone()          # the graph's output buffer is overwritten by its next replay
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from nucleus_image.model import TextKV

from .denoise import denoise_step

WARMUP_STEPS = 3  # eager steps before a capture, as torch.cuda.make_graphed_callables does


def check_cuda_graph(device: torch.device | str) -> None:
    """Refuse devices CUDA graphs cannot run on, saying what is needed."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(
            f"CUDA graphs replay the denoising step on a CUDA GPU; the model is on {device}. Run on a "
            f"GPU (device 'cuda') or leave cuda_graph off"
        )


class GraphedStep:
    """`step_fn(*tensors)` recorded once as a CUDA graph and replayed on every later call.

    The first `warmup` calls run `step_fn` eagerly on a side stream and return its result; the next call captures
    it (on copies of its arguments: the graph's static inputs) and replays. Replays copy their arguments into the
    static inputs and return the graph's static output, which the next replay overwrites: use it or clone it."""

    def __init__(self, step_fn: Callable[..., torch.Tensor], warmup: int = WARMUP_STEPS):
        self.step_fn, self.warmup, self.eager_calls = step_fn, warmup, 0
        self.side_stream: torch.cuda.Stream | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list[torch.Tensor] = []
        self.output: torch.Tensor | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            if not all(t.is_cuda for t in inputs):
                devices = sorted({str(t.device) for t in inputs})
                raise ValueError(
                    f"CUDA graphs need CUDA tensors; the step's inputs are on {', '.join(devices)}. "
                    f"Call denoise_step directly elsewhere"
                )
            if self.eager_calls < self.warmup:
                self.eager_calls += 1
                return self._eager(inputs)
            self._capture(inputs)
        for static, value in zip(self.static, inputs):
            static.copy_(value)
        assert self.graph is not None and self.output is not None
        self.graph.replay()
        return self.output

    def _eager(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        main = torch.cuda.current_stream()
        side = self.side_stream = self.side_stream or torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self.step_fn(*inputs)
        main.wait_stream(side)
        out.record_stream(main)  # allocated on the side stream, read on the main one from here on
        return out

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.static = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.output = self.step_fn(*self.static)
        self.graph = graph


def _kv_tensors(text_kv: TextKV) -> tuple[torch.Tensor, ...]:
    mask = () if text_kv.mask_BL is None else (text_kv.mask_BL,)
    return (*text_kv.keys, *text_kv.values, *mask)


def step_function(
    transformer: Any, text_kv: TextKV, img_shapes: list, guidance_scale: float
) -> Callable[..., torch.Tensor]:
    """denoise_step as a function of tensors only, `(latents, t_R, sigma, sigma_next, *text K/V tensors)`: what a
    graph captures, so the text K/V of each call are copied into the graph like every other input."""
    blocks, offset, masked = len(text_kv.keys), text_kv.text_offset, text_kv.mask_BL is not None

    def step(
        latents: torch.Tensor, t_R: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, *kv: torch.Tensor
    ) -> torch.Tensor:
        rebuilt = TextKV(kv[:blocks], kv[blocks : 2 * blocks], kv[2 * blocks] if masked else None, offset)
        return denoise_step(
            transformer,
            latents,
            t_R,
            sigma,
            sigma_next,
            text_kv=rebuilt,
            img_shapes=img_shapes,
            guidance_scale=guidance_scale,
        )

    return step


class StepGraphs:
    """The captured steps of one pipeline, one per call shape (least recently used dropped beyond `capacity`)."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.graphs: OrderedDict[tuple, GraphedStep] = OrderedDict()

    def __len__(self) -> int:
        return len(self.graphs)

    def clear(self) -> None:
        self.graphs.clear()

    def step(
        self, transformer: Any, text_kv: TextKV, img_shapes: list, guidance_scale: float, latents: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """`step(latents, t_R, sigma, sigma_next)` for this call, replaying this shape's graph."""
        check_cuda_graph(latents.device)
        kv = _kv_tensors(text_kv)
        key = (
            str(latents.device),
            tuple(latents.shape),
            tuple(tuple(t.shape) for t in kv),
            text_kv.text_offset,
            text_kv.mask_BL is not None,
            tuple(tuple(s) for s in img_shapes),
            float(guidance_scale),
            transformer.dtype,
            id(transformer),
        )
        graphed = self.graphs.pop(key, None)
        if graphed is None:
            graphed = GraphedStep(step_function(transformer, text_kv, img_shapes, guidance_scale))
        self.graphs[key] = graphed  # most recently used last
        while len(self.graphs) > self.capacity:
            self.graphs.popitem(last=False)
        return lambda latents, t_R, sigma, sigma_next: graphed(latents, t_R, sigma, sigma_next, *kv)
