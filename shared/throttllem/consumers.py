"""Public surface for consumer plug-ins (see `throttllem._consumers` and the README).

    from throttllem.consumers import Consumer, ConsumerContext, RequestEnergy

    class MyBilling(Consumer):
        def __init__(self, context: ConsumerContext) -> None: ...
        async def on_energy(self, record: RequestEnergy) -> bool | None: ...

and in the plug-in's pyproject.toml:

    [project.entry-points."throttllem.consumers"]
    my-billing = "my_package:MyBilling"
"""

from throttllem._consumers import (
    ENTRY_POINT_GROUP,
    Consumer,
    ConsumerContext,
    RecentIds,
    available_plugins,
)
from throttllem._events import RequestCompleted, RequestEnergy

__all__ = ["ENTRY_POINT_GROUP", "Consumer", "ConsumerContext", "RecentIds", "RequestCompleted",
           "RequestEnergy", "available_plugins"]
