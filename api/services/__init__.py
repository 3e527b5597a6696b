"""What the routes call: one module per service. Route handlers stay a few lines; the mapping
from Temporal's and Stripe's answers to the contract's errors lives here."""
