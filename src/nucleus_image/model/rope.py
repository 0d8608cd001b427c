"""3-axis rotary position embedding, centred ("scale_rope"), with text positions after the image grid.

Each of a head's D/2 rotation pairs belongs to one axis (frame, height, width; sizes axes_dims_rope / 2).
Image token (f, y, x) on an h x w grid sits at height position y - (h - h//2) and width position x - (w - w//2),
so the grid is centred on zero. Text token j sits at position max(h//2, w//2) + j on all three axes, just past
the image's largest positive coordinate. Angles are computed in fp32 exactly as the reference does and the
rotation is one complex multiply (on CPU ~9x faster than the same rotation spelled out in real arithmetic;
torch.compile lowers it without graph breaks).
"""

from __future__ import annotations

import torch


def _angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=positions.device).to(torch.float32).div(dim))
    return torch.outer(positions.to(torch.float32), inv_freq)


def image_angles(
    frames: int, height: int, width: int, axes_dims: tuple[int, int, int], device=None, theta: float = 10000.0
) -> torch.Tensor:
    """Rotation angles (frames*height*width, D/2) for an image grid, in the reference's token order.
    Built on the target device so a forward never copies from the host."""
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    f_ang = _angles(ar(frames), axes_dims[0], theta)
    h_ang = _angles(ar(height) - (height - height // 2), axes_dims[1], theta)
    w_ang = _angles(ar(width) - (width - width // 2), axes_dims[2], theta)
    grid = torch.cat(
        [
            f_ang[:, None, None].expand(frames, height, width, -1),
            h_ang[None, :, None].expand(frames, height, width, -1),
            w_ang[None, None, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    )
    return grid.reshape(frames * height * width, -1)


def text_angles(
    text_len: int, height: int, width: int, axes_dims: tuple[int, int, int], device=None, theta: float = 10000.0
) -> torch.Tensor:
    """Rotation angles (text_len, D/2) for text keys placed after the centred image grid."""
    pos = max(height // 2, width // 2) + torch.arange(text_len, device=device)
    return torch.cat([_angles(pos, d, theta) for d in axes_dims], dim=-1)


def rotations(angles: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers e^{i*angle}, (S, D/2) complex64."""
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x_BHSD: torch.Tensor, rot_SK: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2k], x[2k+1]) by pair k's rotation, in fp32, returning x's dtype."""
    x = torch.view_as_complex(x_BHSD.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(x * rot_SK).flatten(-2).to(x_BHSD.dtype)
