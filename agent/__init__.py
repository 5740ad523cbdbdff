"""rma-agent: the peer-to-peer discovery daemon of the RMA distributed platform."""

__version__ = "0.2.0"
