"""The remote avatar: an avatar that joins a room as its own participant.

``protocol`` is the wire contract between an agent and its avatar (the job, the gesture RPC and
its answer, the default names); ``participant`` is one avatar in one room; ``jobs`` hosts them as
LiveKit agent jobs; ``dispatcher`` asks LiveKit to send one.
"""
