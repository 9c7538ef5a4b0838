"""recstream's connectors: the listeners and the command line around an :class:`engine.Engine`.

``connectors.forward`` is the Fluent Forward listener, ``connectors.http`` and
``connectors.websocket`` the Starlette routes (ingestion, recommendations, push, admin, the
dashboard), ``connectors.node`` the composition ``recstream serve`` runs (:class:`Node`: an
engine and its listeners), ``connectors.cli`` the command line and ``connectors.client`` a
Forward producer and a subscriber for Python programs. Every module here uses only the names
``engine`` exports.
"""

from .node import Node as Node
from .node import serve as serve

__all__ = ["Node", "serve"]
