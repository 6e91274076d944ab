"""The original VLM-RM code's pipeline (SPEC §1.4), the reference every row is measured against."""
from __future__ import annotations

from typing import Callable, cast

import torch
import torch.nn.functional as F

from vlmrm_fast.ops.preprocess import PreprocessSpec
from vlmrm_fast.profiler.options import SEED_FRAME_SIZE  # noqa: F401  (480: the seed always gets those frames)

SEED = "seed"
SEED_CUDA_DTYPE = "fp16-autocast"  # fp32 weights under torch.autocast(float16), as the original ran
GOAL, BASELINE, ALPHA = "a humanoid robot kneeling", "a humanoid robot", 0.5


# --------------------------------------------------------------------------- the seed pipeline


class SeedPipeline:
    """The original VLM-RM code's reward path (SPEC §1.4), the reference for ``speedup_vs_seed``.

    fp32 weights; on CUDA preprocessing and the tower run under ``torch.autocast(float16)`` as the
    original did (plain fp32 on CPU). Frames uint8 [N, H, W, 3] are permuted to NCHW, cast to
    float32 at full resolution, divided by 255, resized with torchvision's bicubic (no antialiasing)
    and normalised; the embedding is normalised; the reward is ``1 - 0.5 |(x - g) @ M|^2`` with the
    explicit D x D matrix ``M = alpha u u^T + (1 - alpha) I``, built once (random g and unit u).
    """

    def __init__(self, model: torch.nn.Module, spec: PreprocessSpec, device: torch.device) -> None:
        import torchvision.transforms.functional as tvf
        from torchvision.transforms import InterpolationMode

        self._tvf, self._bicubic = tvf, InterpolationMode.BICUBIC
        self.model = model.eval().to(device)
        self.spec = spec
        self.device = device
        with torch.inference_mode():
            dim = self.tower(torch.zeros((1, 3) + tuple(spec.size), device=device)).shape[1]
        generator = torch.Generator().manual_seed(0)
        goal = F.normalize(torch.randn(dim, generator=generator), dim=0)
        direction = F.normalize(torch.randn(dim, generator=generator), dim=0)
        projection = ALPHA * torch.outer(direction, direction) + (1.0 - ALPHA) * torch.eye(dim)
        self.goal, self.projection = goal.to(device), projection.to(device)

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> normalised float32 [N, 3, S, S]."""
        with self._autocast():
            x = frames.permute(0, 3, 1, 2).float() / 255.0
            x = self._tvf.resize(x, list(self.spec.size), interpolation=self._bicubic, antialias=False)
            return self._tvf.normalize(x, list(self.spec.mean), list(self.spec.std))

    def tower(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> unit embeddings [N, D] (float16 under autocast)."""
        encode_image = cast(Callable[..., torch.Tensor], self.model.encode_image)  # open_clip's method
        with self._autocast():
            return encode_image(pixels, normalize=True)

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N, D] -> rewards [N], through the D x D matrix."""
        x = embeddings / embeddings.norm(dim=-1, keepdim=True)
        return 1.0 - ((x - self.goal) @ self.projection).norm(dim=-1) ** 2 / 2

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        return self.score(self.tower(self.preprocess(frames)))
