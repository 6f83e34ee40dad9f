"""PyPubSub's HTTP daemon: configuration, the aiohttp application and its lifecycle."""

__version__ = "0.9.0"
__all__ = ["__version__"]
