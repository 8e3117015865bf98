"""The encoder interface shared by every patch encoder, and the patch checks they all use."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np


class Encoder:
    """Map image patches to one feature vector each.

    An encoder is stateless or frozen: it is never fitted. Subclasses set `name`, `patch_px` and `dim` and
    implement :meth:`_transform`; :meth:`transform` checks the input and resizes patches of another size.

    Attributes
    ----------
    name
        Short name, used in keys such as ``obsm["X_omx_<name>"]``.
    patch_px
        Side in pixels of the square patches the encoder works on.
    dim
        Length of the feature vector.
    mpp
        Native resolution in microns per pixel, for encoders trained at one (foundation models): `omx.tl` then
        cuts patches of ``patch_px * mpp`` microns by default. None when the encoder has no native resolution.
    """

    name: str = "encoder"
    patch_px: int
    mpp: float | None = None
    #: Whether :meth:`transform` takes patches of any size as they are (True) or resizes them to `patch_px`.
    accepts_any_size: ClassVar[bool] = False

    @property
    def dim(self) -> int:
        """Length of the feature vector."""
        raise NotImplementedError

    def transform(self, patches: np.ndarray) -> np.ndarray:
        """Encode patches.

        Parameters
        ----------
        patches
            RGB patches, ``uint8`` of shape ``(n, H, W, 3)`` with ``H == W``. Patches whose side differs from
            `patch_px` are resized to it.

        Returns
        -------
        Features, ``float32`` of shape ``(n, dim)``.
        """
        patches = check_patches(patches)
        if not self.accepts_any_size and patches.shape[1] != self.patch_px:
            patches = resize_patches(patches, self.patch_px)
        if len(patches) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.asarray(self._transform(patches), dtype=np.float32)
        return out.reshape(len(patches), -1)

    __call__ = transform

    def _transform(self, patches: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def get_params(self) -> dict[str, Any]:
        """Return the JSON-able parameters that rebuild this encoder, with its class under ``"class"``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = {k: v for k, v in self.get_params().items() if k != "class"}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


def check_patches(patches: np.ndarray, *, patch_px: int | None = None, owner: str = "The encoder") -> np.ndarray:
    """Return ``patches`` as a ``uint8`` array of shape ``(n, H, H, 3)`` or raise a `ValueError` that names the fix.

    Parameters
    ----------
    patches
        Candidate patch array.
    patch_px
        Required side in pixels; any square size when None.
    owner
        Name of the caller, used in error messages.
    """
    patches = np.asarray(patches)
    if patches.ndim == 3 and patches.shape[-1] == 3:
        patches = patches[None]
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.shape[1] != patches.shape[2]:
        want = f"(n, {patch_px}, {patch_px}, 3)" if patch_px else "(n, H, H, 3)"
        raise ValueError(
            f"{owner} expects square RGB patches of shape {want} (channels last), got shape {patches.shape}. "
            "Cut patches with `omx.pp` or transpose channels-first arrays with `patches.transpose(0, 2, 3, 1)`."
        )
    if patch_px is not None and patches.shape[1] != patch_px:
        raise ValueError(
            f"{owner} expects patches of {patch_px} x {patch_px} px, got {patches.shape[1]} x {patches.shape[2]}. "
            f"Cut patches with size_px={patch_px}, or resize them with `omx.encoders.resize_patches(patches, "
            f"{patch_px})`."
        )
    if patches.dtype != np.uint8:
        if np.issubdtype(patches.dtype, np.floating) and patches.size and np.nanmax(patches) <= 1.0:
            hint = "they look like floats in [0, 1]: pass `(patches * 255).round().astype(np.uint8)`"
        else:
            hint = "pass `patches.astype(np.uint8)` if they are 0-255 intensities"
        raise ValueError(f"{owner} expects uint8 RGB patches, got dtype {patches.dtype}; {hint}.")
    return patches


def resize_patches(patches: np.ndarray, size: int) -> np.ndarray:
    """Resize square ``uint8`` patches ``(n, H, H, 3)`` to ``(n, size, size, 3)``.

    Integer downscaling factors average pixel blocks (`skimage.transform.downscale_local_mean`); other factors
    use bilinear interpolation (`skimage.transform.resize`, with anti-aliasing when shrinking).

    Parameters
    ----------
    patches
        ``uint8`` patches of shape ``(n, H, H, 3)``.
    size
        Target side in pixels.

    Returns
    -------
    ``uint8`` patches of shape ``(n, size, size, 3)``.
    """
    patches = check_patches(patches)
    n, side = patches.shape[0], patches.shape[1]
    if side == size:
        return patches
    from skimage.transform import downscale_local_mean, resize

    if side % size == 0:
        f = side // size
        return np.clip(downscale_local_mean(patches, (1, f, f, 1)) + 0.5, 0, 255).astype(np.uint8)
    out = resize(patches, (n, size, size, 3), order=1, preserve_range=True, anti_aliasing=side > size, mode="reflect")
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
