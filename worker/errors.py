"""The root of every error the worker raises on purpose: one tree, so a caller (the worker's CLI,
its HTTP service, ``esrfarm compare``) catches :class:`WorkerError` and shows ``str(error)``, one
sentence that says what to change::

  WorkerError
  ├── SettingsError              settings that cannot work together (names the flag)   worker.settings
  ├── ModelLoadError             a model could not be found, provided or loaded         worker.models
  │   ├── UnknownModelError, ModelUnavailableError, ChecksumMismatchError,
  │   └── ModelFileNotFoundError, CorruptModelFileError, UnsupportedArchitectureError
  ├── NcnnFormatError            an ncnn .param/.bin pair this converter cannot read    worker.ncnn_weights
  ├── VulkanUnavailableError     no (such) Vulkan device for the ncnn backend           worker.ncnn_runtime
  ├── InferenceError             a batch could not be upscaled after every fallback     worker.upscaling
  ├── FrameError                 one frame of a batch could not be read or written      worker.frames
  └── RequestError               a request the worker refuses (an HTTP status and why)  worker.service

Each class lives beside the code that raises it; the errors of the protocol (documents, paths,
frame files) are :class:`manifests.errors.ProtocolError`, those of ffmpeg and PyAV
:class:`media.errors.MediaError`: trees of their own packages.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""
