"""The client side: lives inside the user's process."""
