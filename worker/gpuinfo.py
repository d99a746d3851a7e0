"""GPU memory of the worker's device: NVML where present, else the backend's own figure."""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger(__name__)


class _HasMemoryInfo(Protocol):
    device: Any

    def memory_info(self) -> dict[str, int] | None: ...


class GpuMemoryProbe:
    """Finds the NVML handle of a torch CUDA device (by UUID, then by PCI bus id) once."""

    def __init__(self, upscaler: _HasMemoryInfo) -> None:
        self._upscaler = upscaler
        self._handle: Any = None
        self._nvml: Any = None
        if getattr(upscaler.device, "type", "cpu") == "cuda":
            self._handle = self._find_nvml_handle()

    def _find_nvml_handle(self) -> Any:
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(self._upscaler.device)
        except Exception as exc:  # no NVML library, no driver: fall back to the runtime
            log.info("NVML not available (%s); GPU memory comes from torch", exc)
            return None
        self._nvml = pynvml
        candidates = []
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            candidates.append(
                lambda: pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            )
        domain, bus_id, device_id = (
            getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")
        )
        if None not in (domain, bus_id, device_id):
            bus = f"{domain:08X}:{bus_id:02X}:{device_id:02X}.0"
            candidates.append(lambda: pynvml.nvmlDeviceGetHandleByPciBusId(bus))
        for candidate in candidates:
            try:
                return candidate()
            except Exception:
                continue
        log.info("no NVML device matches %s; GPU memory comes from torch", self._upscaler.device)
        return None

    def read(self) -> dict[str, Any] | None:
        """``{"used": bytes, "total": bytes, "source": "nvml" | "torch" | "vulkan"}``, or None on the CPU.

        On Vulkan (the ncnn backend) ``total`` is the device's heap budget and ``used`` is None: ncnn's
        Python API does not report usage."""
        if self._handle is not None:
            try:
                info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
                return {"used": int(info.used), "total": int(info.total), "source": "nvml"}
            except Exception as exc:
                log.warning("NVML memory query failed (%s); using torch from now on", exc)
                self._handle = None
        memory = self._upscaler.memory_info()
        if memory is None:
            return None
        source = "vulkan" if getattr(self._upscaler.device, "type", "cpu") == "vulkan" else "torch"
        return {"used": memory.get("used"), "total": memory["total"], "source": source}
