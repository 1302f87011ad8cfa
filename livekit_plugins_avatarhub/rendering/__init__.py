"""Rendering: a runtime turns speech into frames, which become a LiveKit track or an MP4.

``runtime`` is the contract every engine meets (bitHuman's ``AsyncBithuman``, the ``demo``);
``loader`` opens one for an avatar; ``generator`` and ``publish`` feed LiveKit; ``mp4`` writes
a file.
"""
