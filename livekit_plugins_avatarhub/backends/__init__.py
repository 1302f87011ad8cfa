"""Where an ``AvatarSession`` renders: in this process, in the avatar service, or on an avatar
worker reached through LiveKit's dispatch. ``base`` is the contract the three meet."""
