"""overlayfs-py: a union filesystem in user space (pyfuse3 + trio), a peer of the kernel's
overlayfs and of fuse-overlayfs. Public API: Config, mount(), run(), __version__."""
from .config import Config, ConfigError

__version__ = "0.1.0"


def mount(*args, **kwargs):
    """Context manager: mount a layer stack in a child daemon; see overlayfs_py.api.mount."""
    from .api import mount as _mount
    return _mount(*args, **kwargs)


def run(config, on_ready=None):
    """Mount and serve in this process until unmounted; see overlayfs_py.session.run."""
    from .session import run as _run
    return _run(config, on_ready)


__all__ = ["Config", "ConfigError", "mount", "run", "__version__"]
