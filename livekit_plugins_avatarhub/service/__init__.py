"""The self-hosted avatar service: an HTTP API that sends avatars into LiveKit rooms.

Two entry points start the same avatar participant (``remote.participant``): the Flutter
join-room flow's ``POST /v1/agents/{id}/join-room`` and the launch request LiveKit's bithuman
plugin sends in cloud mode (``POST /v1/runtime-tokens/request``). ``app`` holds the routes,
``manager`` the avatars it runs, ``dispatched`` the same routes answered through LiveKit's
dispatch, ``metrics`` its Prometheus text (the ``service`` extra adds prometheus-client).
"""
