"""``preview``: the avatar live in a browser, in a real LiveKit room, with one command.

``livekit_local`` starts a LiveKit server on loopback when none is configured, ``page`` serves
the package's own page (``assets/``) on 127.0.0.1, and ``command`` puts the avatar in the room
and keeps everything running until Ctrl-C.
"""
