"""The HTTP edge of the checkout service."""
