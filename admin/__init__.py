"""``chat-admin``: operators see and steer the cluster through Redis."""
