"""Moderation: the :class:`Moderator` API and the ``saferlhf-moderate`` command."""

from saferlhf.moderation.api import Moderator, Verdict

__all__ = ["Moderator", "Verdict"]
