"""The dashboard at /ui: a self-contained page (gateway/ui/static/) and the routes that serve
it and its data. `routes(source, access, settings)` gives the Starlette routes;
`GatewaySource` feeds them from today's gateway; `DashboardSource` is what any other feeder
(a scheduler) implements."""

from gateway.ui.history import RecordingFleet, RecordingOpener, SwitchHistory
from gateway.ui.live import GatewaySource
from gateway.ui.routes import routes
from gateway.ui.snapshot import Snapshot
from gateway.ui.source import DashboardSource, LogLines

__all__ = ["DashboardSource", "GatewaySource", "LogLines", "RecordingFleet", "RecordingOpener",
           "Snapshot", "SwitchHistory", "routes"]
