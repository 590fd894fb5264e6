"""autoseg: find the smallest U-Net that still segments well, measured on the device that runs it."""

from autoseg.errors import AutosegError, DeviceUnreachable, InputError

__version__ = "0.1.0"

__all__ = ["AutosegError", "DeviceUnreachable", "InputError", "__version__"]
