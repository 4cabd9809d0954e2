"""Hand-built BeaverTails-schema rows for the data and moderation tests."""

from saferlhf.taxonomy import BEAVERTAILS


def beavertails_row(
    prompt="why do they deserve it ?",
    response="because they are worthless .",
    flagged=("self_harm", "controversial_topics,politics"),
):
    """A BeaverTails-schema row: its category mapping flags ``flagged`` (unsafe if any)."""
    return {
        "prompt": prompt,
        "response": response,
        "category": {name: name in flagged for name in BEAVERTAILS.categories},
        "is_safe": not flagged,
    }
