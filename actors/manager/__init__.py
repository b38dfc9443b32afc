"""The OrderManager: entry point for orders, workflow registry, and supervisor.

- ``PlaceOrder`` is idempotent by order id (``placement``).
- After ``OrderPlaced`` commits, the workflow registered for it (``OrderSaga``) is created for
  the order, like the seed's ``AddWorkflow<OrderPlacedEvent, OrderFulfillmentSaga>()``
  (``registry``).
- Supervision: a saga that aborts, is poisoned or whose process dies is recovered from its stream
  and compensated, as ``saga.supervision`` decides (``supervision``). A dead service is restarted
  (with back-off) from its durable state and the sagas are told its new address (``services``).
  On start every order without a terminal event is driven on (``actor``).
"""

from actors.manager.actor import OrderManager
from actors.manager.registry import WORKFLOWS, register_workflow
from actors.manager.services import SERVICES

__all__ = ["SERVICES", "WORKFLOWS", "OrderManager", "register_workflow"]
