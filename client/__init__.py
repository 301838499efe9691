"""``chat-client``: the terminal program people chat with."""
