"""Versions of the controller's wire contract (controller.proto), shared by client and server.

Clients compare `CONTROLLER_WIRE_VERSION` with the controller's `Info` reply at connect; a
small module so that the client can read it without importing the server.
"""

# Bumped on every incompatible change of controller.proto; clients compare it at connect.
CONTROLLER_WIRE_VERSION = 1
