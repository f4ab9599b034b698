"""mobile-vla: turn a pretrained vision-language model into a mobile robot's VLA policy."""

from mobile_vla.errors import ConfigError, DataError, EpisodeError, MobileVLAError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "EpisodeError", "MobileVLAError", "__version__"]
