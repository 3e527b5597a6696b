"""Every side effect of the checkout saga, grouped by the resource it touches."""
