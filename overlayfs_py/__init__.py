"""overlayfs-py: a union filesystem in user space (pyfuse3 + trio), a peer of the kernel's
overlayfs and of fuse-overlayfs. Public API: Config, mount(), image_mount(), run(),
__version__; container images (unpack, history, diff, commit, the store) in
``overlayfs_py.image``."""
from .config import Config, ConfigError

__version__ = "0.1.0"


def mount(*args, **kwargs):
    """Context manager: mount a layer stack in a child daemon; see overlayfs_py.api.mount."""
    from .api import mount as _mount
    return _mount(*args, **kwargs)


def image_mount(*args, **kwargs):
    """Context manager: unpack an image into the store and mount it; see
    overlayfs_py.api.image_mount."""
    from .api import image_mount as _image_mount
    return _image_mount(*args, **kwargs)


def run(config, on_ready=None):
    """Mount and serve in this process until unmounted; see overlayfs_py.session.run."""
    from .session import run as _run
    return _run(config, on_ready)


__all__ = ["Config", "ConfigError", "image_mount", "mount", "run", "__version__"]
