"""A small Django app for the tests: the seed's orders, paid with an event, and the
shipments a consumer makes of those events."""
