"""Demo and test support: local stand-ins for the services a real run talks to.

Not part of the product: its dependencies (aiosmtpd) are in the `demo` dependency group.
"""
